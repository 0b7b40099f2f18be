-- DataComp "basic": the caption is longer than 2 words and longer than 5 characters.
-- Words are runs of non-space characters; a NULL caption gives NULL and so drops.
length(trim(caption)) > 5
AND regexp_matches(caption, '\S\s+\S+\s+\S')
