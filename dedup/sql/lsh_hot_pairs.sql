-- Pairs within $k inside one table's capped buckets (lsh_hot): every row meets the other
-- side's representatives (its $cap smallest ids in the bucket); for a two-sided join the
-- left's representatives also meet the right's other rows. n * cap candidates per bucket
-- instead of n^2 / 2. A self-join reports each unordered pair once (smaller id first).
INSERT INTO lsh_found
SELECT CASE WHEN $self THEN least(a.id, b.id) ELSE a.id END,
       CASE WHEN $self THEN greatest(a.id, b.id) ELSE b.id END,
       bit_count(xor(a.h, b.h))
FROM (SELECT * FROM lsh_lhot WHERE v IN (SELECT v FROM lsh_hot)) a
JOIN (SELECT * FROM lsh_rhot WHERE r <= $cap AND v IN (SELECT v FROM lsh_hot)) b ON a.v = b.v
WHERE bit_count(xor(a.h, b.h)) <= $k AND (NOT $self OR a.id <> b.id)
UNION ALL
SELECT a.id, b.id, bit_count(xor(a.h, b.h))
FROM (SELECT * FROM lsh_lhot WHERE r <= $cap AND v IN (SELECT v FROM lsh_hot)) a
JOIN (SELECT * FROM lsh_rhot WHERE r > $cap AND v IN (SELECT v FROM lsh_hot)) b ON a.v = b.v
WHERE NOT $self AND bit_count(xor(a.h, b.h)) <= $k;
