-- A query filter (the row's fate depends on other rows): drops boilerplate alt-text such
-- as "logo" or "image" that appears on more than text_filter.max_caption_repeats distinct
-- URLs. Returns the uids to keep.
SELECT uid FROM pairs
WHERE lower(caption) NOT IN (
    SELECT lower(caption) FROM pairs
    WHERE caption IS NOT NULL
    GROUP BY lower(caption)
    HAVING count(DISTINCT url) > getvariable('max_caption_repeats')
)
