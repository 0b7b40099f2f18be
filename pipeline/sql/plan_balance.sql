-- witforge plan: MetaCLIP's expected kept pairs when the balance stage's input grows by $r:
-- each entry's match count grows by $r, a pair is kept with probability
-- 1 - prod(1 - min(1, t / count(e))) over its entries (balance_expected.sql), and each pilot
-- pair stands for $r pairs. {matches}: the stage's matches/*.parquet (uid, entry_id).
WITH m AS (SELECT uid, entry_id FROM read_parquet('{matches}')),
counts AS (SELECT entry_id, count(*) * $r AS n FROM m GROUP BY entry_id),
per_uid AS (SELECT list(c.n) AS ns FROM m JOIN counts c USING (entry_id) GROUP BY m.uid)
SELECT $r * coalesce(sum(1.0 - list_product(list_transform(ns, lambda x: 1.0 - least(1.0, $t / x)))),
                     0)::DOUBLE
FROM per_uid
