-- The rows of one table's flagged keys, numbered by id within their key (r) with the key's
-- exact size (n), on each side; lsh_hot = the keys with more than $cap rows on both sides.
-- In those buckets only the $cap smallest ids ("representatives") meet every other row.
CREATE OR REPLACE TEMP TABLE lsh_lhot AS
SELECT id, h, v, row_number() OVER (PARTITION BY v ORDER BY id) AS r,
       count(*) OVER (PARTITION BY v) AS n
FROM (SELECT id, h, h & $m::UBIGINT AS v FROM lsh_left
      WHERE (h & $m::UBIGINT) IN (SELECT v FROM lsh_flag));
CREATE OR REPLACE TEMP TABLE lsh_rhot AS
SELECT id, h, v, row_number() OVER (PARTITION BY v ORDER BY id) AS r,
       count(*) OVER (PARTITION BY v) AS n
FROM (SELECT id, h, h & $m::UBIGINT AS v FROM lsh_right
      WHERE NOT $self AND (h & $m::UBIGINT) IN (SELECT v FROM lsh_flag))
UNION ALL
SELECT * FROM lsh_lhot WHERE $self;
CREATE OR REPLACE TEMP TABLE lsh_hot AS
SELECT l.v, l.n AS n_left, r.n AS n_right
FROM (SELECT DISTINCT v, n FROM lsh_lhot) l
JOIN (SELECT DISTINCT v, n FROM lsh_rhot) r USING (v)
WHERE l.n > $cap AND r.n > $cap;
