-- Up to $n dropped rows per reason of one stage, chosen by md5('<stage>:<reason>:' || uid):
-- the same rows on every run and machine, whatever the order of dropped.parquet.
SELECT reason, uid, detail
FROM (
    SELECT reason, uid, detail,
           row_number() OVER (PARTITION BY reason
                              ORDER BY md5($stage || ':' || reason || ':' || uid), uid) AS k
    FROM read_parquet($dropped)
)
WHERE k <= $n
ORDER BY reason, k
