-- Expected kept pairs for cap $t: a pair with matched entries e is kept with probability
-- 1 - prod(1 - p(e)), p(e) = min(1, t / count(e)); ns is sorted, so ns[1] <= t means p = 1.
SELECT coalesce(sum(CASE WHEN ns[1] <= $t THEN 1.0
                                 ELSE 1.0 - list_product(list_transform(ns, lambda x: 1.0 - $t / x))
                            END), 0)::DOUBLE
FROM count_sets;
