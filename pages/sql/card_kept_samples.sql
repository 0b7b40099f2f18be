-- A random-looking but reproducible sample of the final kept rows (md5 of the uid).
SELECT * FROM read_parquet($kept)
ORDER BY md5('kept:' || uid), uid
LIMIT $n
