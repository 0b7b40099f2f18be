-- A user filter next to the build (the demo's): keep captions of at least two words.
-- DataComp's caption_length wants three, which drops clip-art and emoji names such as
-- "soccer ball" that describe their image perfectly well.
regexp_matches(caption, '\S+\s+\S')
