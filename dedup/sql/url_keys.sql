-- url_dedup, step 1 of 3: a key per row and the hashes that repeat.
-- Placeholders (str.format): canonical = url_canonical.sql over the input read with
-- file_row_number=true, keys = a Parquet file for the per-row keys.
-- Rows are addressed by their row number in the input file (a BIGINT) rather than by uid:
-- the per-row keys stay narrow.
-- Per row: a 64-bit hash of (canonical url, caption), the url length (the survivor rule),
-- and the canonical url only where it differs from url (NULL for most rows); streamed to a
-- Parquet file, not held as a table: at 96M rows that table was 2+ GB of the memory the
-- hash aggregate below then had to spill around.
COPY (
    SELECT file_row_number AS rn, hash(coalesce(canon, url), caption) AS h,
           length(url) AS url_len, canon
    FROM ({canonical})
) TO {keys} (FORMAT parquet);
CREATE OR REPLACE TEMP VIEW url_keys AS SELECT * FROM read_parquet({keys});

-- Only rows whose hash repeats can be duplicates (8.3M hashes of 96M rows in the bench).
CREATE OR REPLACE TEMP TABLE url_repeated AS
SELECT h, count(*) AS n FROM url_keys GROUP BY h HAVING count(*) > 1;
