-- One table of the multi-index join (dedup/lsh.py): pairs whose hashes agree on the table's
-- blocks ($m, the OR of their masks) and are within $k bits. Two hashes within k agree on at
-- least B - k of B disjoint blocks (pigeonhole), so the union over all C(B, k) tables finds
-- every pair within k. lsh_l / lsh_r are the inputs without this table's capped (hot) keys,
-- which lsh_hot_pairs.sql handles. The key is one UBIGINT (h & mask): one column hashes
-- ~1.6x faster than two.
-- $self: left and right are the same table; report each unordered pair once (a < b).
INSERT INTO lsh_found
SELECT a.id, b.id, bit_count(xor(a.h, b.h))
FROM lsh_l a JOIN lsh_r b ON (a.h & $m::UBIGINT) = (b.h & $m::UBIGINT)
WHERE bit_count(xor(a.h, b.h)) <= $k
  AND (NOT $self OR a.id < b.id)
