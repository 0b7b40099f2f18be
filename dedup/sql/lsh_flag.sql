-- Keys of one table ($m) that may hold more than $cap rows, from a systematic sample (ids
-- divisible by $every): a key is flagged when the sample holds at least $hits of its rows
-- (half of what a bucket of exactly $cap rows would show), on both sides of the join.
-- Flagged keys are then counted exactly (lsh_hot.sql). For a self-join both sides are the
-- same and the intersection changes nothing.
CREATE OR REPLACE TEMP TABLE lsh_flag AS
SELECT h & $m::UBIGINT AS v FROM lsh_left WHERE id % $every = 0
GROUP BY v HAVING count(*) >= $hits
INTERSECT
SELECT h & $m::UBIGINT AS v FROM lsh_right WHERE id % $every = 0
GROUP BY v HAVING count(*) >= $hits;
