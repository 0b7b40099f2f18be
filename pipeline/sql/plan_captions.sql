-- witforge plan: how the captions ingest runs through ftfy (those with a character outside
-- printable ASCII or a '&', as ingest_stage.sql keeps them raw) grow with the rows: ftfy runs
-- once per distinct caption. Distinct ones over every row and over 8 random halves of the
-- rows (a row's half drawn from its position and the seed). {input}: ingest's kept rows.
WITH c AS (
  SELECT file_row_number AS pos,
         CASE WHEN regexp_matches(caption, '[^\x20-\x7E]|&') THEN caption END AS key
  FROM read_parquet('{input}', file_row_number = true)
)
SELECT -1 AS seed, count(*) AS n, count(DISTINCT key) AS g FROM c
UNION ALL
SELECT s.seed, count(*), count(DISTINCT key)
FROM c, range(8) s(seed)
WHERE hash(pos, s.seed, 'witforge-plan') % 2 = 0
GROUP BY s.seed
ORDER BY seed
