-- witforge plan: how a stage's distinct keys (one robots.txt per origin, one ftfy call per
-- caption) grow with its rows: distinct keys over every row and over 8 random halves of the
-- rows (a row's half drawn from its position and the seed). Placeholder keys: a query of
-- (pos, key), plan_origins.sql or plan_captions.sql; a NULL key is no key.
WITH k AS ({keys})
SELECT -1 AS seed, count(*) AS n, count(DISTINCT key) AS g FROM k
UNION ALL
SELECT s.seed, count(*), count(DISTINCT key)
FROM k, range(8) s(seed)
WHERE hash(pos, s.seed, 'witforge-plan') % 2 = 0
GROUP BY s.seed
ORDER BY seed
