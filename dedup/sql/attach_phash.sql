-- Join each row's image (tar, key) to its cached pHash. A row whose member is missing from its
-- tar, or whose bytes do not decode, gets phash NULL and a reason in phash_error.
CREATE OR REPLACE TEMP TABLE hashed AS
SELECT s.*, p.phash,
       CASE WHEN p.key IS NULL THEN 'no image member ' || s.key || ' in ' || s.tar
            ELSE p.error END AS phash_error
FROM src s
LEFT JOIN tarmap m ON s.tar = m.tar
LEFT JOIN phash_cache p ON p.tar = m.abs AND p.key = s.key;
