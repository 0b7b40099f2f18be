-- Near-duplicate pairs of 64-bit hashes by banded LSH (multi-index hashing).
-- Inputs (temp views set up by dedup/lsh.py): lsh_left(id, h UBIGINT), lsh_right(id, h UBIGINT),
-- lsh_bands(band, shift, mask). Two hashes within Hamming distance k agree exactly on at least
-- one of b >= k + 1 disjoint bands (pigeonhole), so an equi-join on (band, band value) finds
-- every such pair; the exact distance then filters the candidates.
-- The join key packs the band number above the band value (bands of >= 2 are <= 32 bits wide;
-- with one band, band 0 adds nothing): one UBIGINT key hashes ~1.6x faster than two columns.
-- $self: left and right are the same table; report each unordered pair once (a < b).
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
