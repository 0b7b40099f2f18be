-- DataComp "basic": the caption is longer than 2 words and longer than 5 characters.
-- Words are runs of non-space characters; a NULL caption gives NULL and so drops.
-- Three words already make 5 characters after trimming, and exactly 5 only as "a b c"
-- (three one-character words, single spaces): two regular expressions say it without
-- trim() and length(), which copy and count every caption (3x slower).
regexp_matches(caption, '\S\s+\S+\s+\S')
AND NOT regexp_matches(caption, '^\s*\S\s\S\s\S\s*$')
