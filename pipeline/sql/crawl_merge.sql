-- Join img2dataset's per-shard results back to the crawl input by uid.
-- A uid may have been tried in several attempts (first crawl, --retry-failed, rows added
-- upstream later); its latest attempt wins. Placeholders are filled by pipeline/crawl.py:
--   {results}  a UNION ALL of SELECT <attempt> AS attempt, <img2dataset parquet columns>
--   {hashes}   a relation of (attempt, key, tar, sha256, bytes): each stored image
--   {reasons}  the name of a table (error_message, reason) made by classify_error
CREATE OR REPLACE TEMP TABLE crawl_latest AS
SELECT * FROM ({results})
QUALIFY row_number() OVER (PARTITION BY uid ORDER BY attempt DESC) = 1;

CREATE OR REPLACE TEMP TABLE crawl_joined AS
SELECT i.uid AS _uid, l.*, h.tar, h.sha256, h.bytes, r.reason
FROM read_parquet('{input}') i
LEFT JOIN crawl_latest l ON l.uid = i.uid
LEFT JOIN ({hashes}) h ON h.attempt = l.attempt AND h.key = l.key
LEFT JOIN {reasons} r ON r.error_message = l.error_message;

-- Rows that would break "rows in = kept + dropped" (the stage raises on any).
CREATE OR REPLACE TEMP VIEW crawl_problems AS
SELECT count(*) FILTER (WHERE status IS NULL) AS no_result,
       count(*) FILTER (WHERE status = 'success' AND sha256 IS NULL) AS no_image,
       count(*) - count(DISTINCT _uid) AS repeated_uid
FROM crawl_joined;

-- Successes: every input column, then the crawl's own ({input_cols} excludes clashes).
CREATE OR REPLACE TEMP VIEW crawl_kept AS
SELECT {input_cols}, j.status, j.error_message, j.width, j.height, j.original_width,
       j.original_height, j.sha256, j.source_sha256, j.bytes, j.tar, j.key, j.attempt
FROM read_parquet('{input}') i JOIN crawl_joined j ON j._uid = i.uid
WHERE j.status = 'success'
ORDER BY i.uid;

CREATE OR REPLACE TEMP VIEW crawl_dropped AS
SELECT _uid AS uid, 'crawl' AS stage, coalesce(reason, 'other') AS reason,
       coalesce(error_message, status) AS detail
FROM crawl_joined
WHERE status <> 'success'
ORDER BY uid;
