-- Exact url+caption dedup on the canonical URL (as cc2dataset does), in three passes.
-- Needs: macro canonical_url (url_canonical.sql); $input (Parquet), $strip (list of names).
-- 1. a 64-bit hash of (canonical url, caption) per row: narrow, so the group-by is cheap;
CREATE OR REPLACE TEMP TABLE url_keys AS
SELECT uid, hash(canonical_url(url, $strip), caption) AS h
FROM read_parquet($input);

-- 2. only rows whose hash repeats can be duplicates; for them compare the real strings,
--    so a hash collision can never drop a pair. The survivor of a group is the row with the
--    shortest URL (usually the one without tracking junk), then the smallest uid: a rule that
--    depends on nothing but the rows themselves, not on their order or partitioning.
CREATE OR REPLACE TEMP TABLE url_dups AS
WITH repeated AS (
    SELECT h FROM url_keys GROUP BY h HAVING count(*) > 1
), cand AS (
    SELECT i.uid, i.url, i.caption, canonical_url(i.url, $strip) AS canon
    FROM read_parquet($input) i
    SEMI JOIN (SELECT uid FROM url_keys SEMI JOIN repeated USING (h)) c USING (uid)
), ranked AS (
    SELECT uid,
           first(uid ORDER BY length(url), uid)
               OVER (PARTITION BY canon, caption) AS keeper
    FROM cand
)
SELECT uid, keeper FROM ranked WHERE uid <> keeper;
