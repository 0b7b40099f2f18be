-- Exact url+caption dedup on the canonical URL (as cc2dataset does).
-- Placeholders (str.format): canonical = url_canonical.sql over the input read with
-- file_row_number=true, input = the input path, keys = a Parquet file for the per-row keys.
-- Rows are addressed by their row number in the input file (a BIGINT) rather than by uid:
-- the per-row keys stay narrow.
-- 1. per row: a 64-bit hash of (canonical url, caption), the url length (the survivor rule),
--    and the canonical url only where it differs from url (NULL for most rows);
--    streamed to a Parquet file, not held as a table: at 96M rows that table was 2+ GB of
--    the memory the hash aggregate below then had to spill around.
COPY (
    SELECT file_row_number AS rn, hash(coalesce(canon, url), caption) AS h,
           length(url) AS url_len, canon
    FROM ({canonical})
) TO {keys} (FORMAT parquet);
CREATE OR REPLACE TEMP VIEW url_keys AS SELECT * FROM read_parquet({keys});

-- 2. only rows whose hash repeats can be duplicates; for them compare the real strings,
--    so a hash collision can never drop a pair. The survivor of a group is the row with the
--    shortest URL (usually the one without tracking junk), then the smallest uid: a rule that
--    depends on nothing but the rows themselves, not on their order or partitioning.
CREATE OR REPLACE TEMP TABLE url_dups AS
WITH cand AS (
    SELECT rn, url_len, canon FROM url_keys
    WHERE h IN (SELECT h FROM url_keys GROUP BY h HAVING count(*) > 1)
), full_cand AS (
    SELECT c.rn, i.uid, c.url_len, coalesce(c.canon, i.url) AS canon, i.caption
    FROM cand c JOIN read_parquet({input}, file_row_number = true) i
        ON i.file_row_number = c.rn
), keepers AS (
    -- one aggregate per group, not a window over every candidate: the window's sort of
    -- 1.7M candidates on (canon, caption) cost 4x this hash aggregate at 10M rows
    SELECT canon, caption, arg_min(uid, (url_len, uid)) AS keeper
    FROM full_cand GROUP BY canon, caption
)
SELECT f.rn, f.uid, k.keeper
FROM full_cand f JOIN keepers k USING (canon, caption)
WHERE f.uid <> k.keeper;
