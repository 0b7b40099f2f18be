-- witforge plan: how the robots stage's origins (scheme://host[:port], one robots.txt fetch
-- each) grow with its input: distinct origins over every row and over 8 random halves of the
-- rows (a row's half drawn from its position and the seed). {input}: the stage's input.
WITH o AS (
  SELECT file_row_number AS pos,
         lower(regexp_extract(url, '^([A-Za-z][A-Za-z0-9+.-]*://[^/?#]*)', 1)) AS origin
  FROM read_parquet('{input}', file_row_number = true)
)
SELECT -1 AS seed, count(*) AS n, count(DISTINCT origin) AS g FROM o
UNION ALL
SELECT s.seed, count(*), count(DISTINCT origin)
FROM o, range(8) s(seed)
WHERE hash(pos, s.seed, 'witforge-plan') % 2 = 0
GROUP BY s.seed
ORDER BY seed
