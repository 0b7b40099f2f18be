WITH lb AS (
    SELECT l.id, l.h, ((l.h >> b.shift) & b.mask) | (b.band::UBIGINT << 40) AS v
    FROM lsh_left l, lsh_bands b
), rb AS (
    SELECT r.id, r.h, ((r.h >> b.shift) & b.mask) | (b.band::UBIGINT << 40) AS v
    FROM lsh_right r, lsh_bands b
)
SELECT lb.id AS a, rb.id AS b, min(bit_count(xor(lb.h, rb.h))) AS distance
FROM lb JOIN rb ON lb.v = rb.v
WHERE bit_count(xor(lb.h, rb.h)) <= $k
  AND (NOT $self OR lb.id < rb.id)
GROUP BY lb.id, rb.id
