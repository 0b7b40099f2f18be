-- Duplicate clusters of one dedup reason: the kept uid (the first 32 hex digits of detail),
-- how many rows were dropped for it, and up to $k of them; $n clusters chosen by the kept
-- uid's md5, the members by theirs.
WITH d AS (
    SELECT uid, detail, regexp_extract(detail, '^([0-9a-f]{32})', 1) AS keeper
    FROM read_parquet($dropped)
    WHERE reason = $reason
)
SELECT keeper, count(*) AS dropped,
       list(uid ORDER BY md5('member:' || uid), uid)[1:$k] AS uids,
       list(detail ORDER BY md5('member:' || uid), uid)[1:$k] AS details
FROM d
WHERE keeper <> ''
GROUP BY keeper
ORDER BY md5('cluster:' || keeper), keeper
LIMIT $n
