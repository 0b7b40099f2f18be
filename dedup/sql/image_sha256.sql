-- Exact duplicates by the sha256 of the stored image bytes (img2dataset's `sha256` column):
-- in each group of equal hashes the smallest uid survives, a rule that depends only on the
-- rows, not on their order or partitioning. Rows without a hash are never exact duplicates.
CREATE OR REPLACE TEMP TABLE sha_drop AS
SELECT uid, kept_uid
FROM (
    SELECT uid, min(uid) OVER (PARTITION BY sha256) AS kept_uid
    FROM readable
    WHERE sha256 IS NOT NULL
)
WHERE uid <> kept_uid;
