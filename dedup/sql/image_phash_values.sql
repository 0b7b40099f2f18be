-- Distinct pHash values among the rows left after exact dedup. Collapsing equal hashes first
-- keeps LSH buckets small (thousands of flat or blank images share one hash), and numbering
-- the values by their smallest uid makes "smallest id in a cluster" = "smallest uid".
CREATE OR REPLACE TEMP TABLE hv AS
SELECT row_number() OVER (ORDER BY rep) AS id, h, rep
FROM (
    SELECT phash AS h, min(uid) AS rep
    FROM readable
    WHERE phash IS NOT NULL AND uid NOT IN (SELECT uid FROM sha_drop)
    GROUP BY phash
);
