-- The shard plan: one row per written sample (a uid repeated $copies times when upsampling),
-- in a global order that is a hash of (uid, copy, seed) — the same for any input order,
-- partitioning or thread count. Inputs: src (the stage input), tars (tar_id, tar: the crawl
-- tars named in src) and members (the image member of each (tar_id, key) found in those tars:
-- ext, data offset, size).
CREATE OR REPLACE TEMP TABLE shard_plan AS
SELECT row_number() OVER (ORDER BY order_key, sample_key) - 1 AS pos, *
FROM (
    SELECT s.uid, c.copy,
           CASE WHEN $copies = 1 THEN s.uid ELSE s.uid || '_' || c.copy::VARCHAR END
               AS sample_key,
           md5(s.uid || chr(31) || c.copy::VARCHAR || chr(31) || $seed::VARCHAR) AS order_key,
           m.tar_id, m.ext, m."offset", m.size
    FROM src s
    JOIN tars t ON t.tar = s.tar
    JOIN members m ON m.tar_id = t.tar_id AND m.key = s.key
    CROSS JOIN range(1, $copies + 1) c(copy)
);
