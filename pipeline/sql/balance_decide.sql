-- One decision per matched uid. The draw for (uid, entry_id) is the first 52 bits of
-- md5(uid, entry_id, seed) as a fraction of 2^52: the same on every machine and DuckDB version
-- (hash() is not), and independent of how the pool is split. Entries with count <= t keep all
-- their pairs without a draw. `rarest` is the matched entry with the smallest count (the one
-- most likely to keep the pair), for the dropped detail.
CREATE OR REPLACE TEMP TABLE decided AS
SELECT m.uid,
       bool_or(CASE WHEN c.n <= $t THEN true
                    ELSE ('0x' || substr(md5(m.uid || chr(31) || m.entry_id::VARCHAR || chr(31)
                                              || $seed::VARCHAR), 1, 13))::BIGINT::DOUBLE
                         / 4503599627370496.0 < $t::DOUBLE / c.n
               END) AS keep,
       min({'n': c.n, 'e': m.entry_id}) AS rarest
FROM matches m JOIN entry_counts c USING (entry_id)
GROUP BY m.uid;
