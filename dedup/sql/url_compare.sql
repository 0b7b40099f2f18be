-- url_dedup, step 3 of 3, once per part: compare the real strings of the part's candidates,
-- so a hash collision can never drop a pair. The survivor of a group is the row with the
-- shortest URL (usually the one without tracking junk), then the smallest uid: a rule that
-- depends on nothing but the rows themselves, not on their order or partitioning.
-- Placeholders: candidates = a glob of the files step 2 wrote, part = this part's number.
INSERT INTO url_dups
WITH cand AS (
    SELECT rn, uid, url_len, canon, caption
    FROM read_parquet({candidates}, hive_partitioning = true)
    WHERE part = {part}
), keepers AS (
    -- one aggregate per group, not a window over every candidate: the window's sort of
    -- 1.7M candidates on (canon, caption) cost 4x this hash aggregate at 10M rows
    SELECT canon, caption, arg_min(uid, (url_len, uid)) AS keeper
    FROM cand GROUP BY canon, caption
)
SELECT c.rn, c.uid, k.keeper
FROM cand c JOIN keepers k USING (canon, caption)
WHERE c.uid <> k.keeper;
