-- url_dedup, step 3 of 3, once per part: compare the real strings of the part's candidates,
-- so a hash collision can never drop a pair. The survivor of a group is the row with the
-- shortest URL (usually the one without tracking junk), then the smallest uid: a rule that
-- depends on nothing but the rows themselves, not on their order or partitioning.
-- Placeholder: candidates = a query of the part's candidates (step 2's query itself when
-- there is one part, else the part's file).
INSERT INTO url_dups
WITH cand AS (
    {candidates}
), keepers AS (
    -- one aggregate per group, not a window over every candidate: the window's sort of
    -- 1.7M candidates on (canon, caption) cost 4x this hash aggregate at 10M rows
    SELECT canon, caption, arg_min(uid, (url_len, uid)) AS keeper
    FROM cand GROUP BY canon, caption
)
SELECT c.rn, c.uid, k.keeper
FROM cand c JOIN keepers k USING (canon, caption)
WHERE c.uid <> k.keeper;
