-- Candidate pairs one table's plain join generates before the distance filter (for the
-- bench and tests: it costs one more join).
SELECT count(*) FROM lsh_l a JOIN lsh_r b ON (a.h & $m::UBIGINT) = (b.h & $m::UBIGINT)
WHERE NOT $self OR a.id < b.id
