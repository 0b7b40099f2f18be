-- Ingest: mark exact repeats of (url, caption) and give every row its fate.
-- Input: view staged(part, r, file_id, uid, url, caption, bad_reason): the staged Parquet
-- parts (r = the row's number in its part) with the ftfy repairs applied; files(file_id,
-- source, file). A row's fate is the first reason that applies; NULL reason = kept.

-- Only uids seen more than once need ranking. A group-by on a 64-bit hash of the uid finds
-- them (narrow: 100M distinct 32-character strings were the aggregate that spilled), and the
-- window then ranks the real uids of those rows alone, so a hash collision only adds a
-- candidate and never makes a repeat. Rows already dropped for a bad URL take no part: a
-- pair is never a repeat of a dropped row. The first row in build order (file, then row)
-- keeps the pair; only the later ones are stored.
CREATE OR REPLACE TEMP TABLE repeats AS
WITH usable AS NOT MATERIALIZED (
    SELECT part, r, file_id, uid, hash(uid) AS h FROM staged WHERE bad_reason IS NULL
), repeated AS (
    SELECT h FROM usable GROUP BY h HAVING count(*) > 1
)
SELECT part, r FROM usable WHERE h IN (SELECT h FROM repeated)
QUALIFY row_number() OVER (PARTITION BY uid ORDER BY file_id, part, r) > 1;

CREATE OR REPLACE TEMP VIEW fated AS
SELECT s.uid, s.url, s.caption, files.source, files.file,
    CASE
        WHEN s.bad_reason IS NOT NULL THEN s.bad_reason
        -- Exact repeats of (url, caption): the first source in build order keeps the pair.
        WHEN x.r IS NOT NULL THEN 'exact_repeat'
    END AS reason
FROM staged s LEFT JOIN repeats x ON s.part = x.part AND s.r = x.r JOIN files USING (file_id);
