-- Ingest, JSON Lines read line by line (only for a file DuckDB's read_json refuses as a whole).
-- Input: jsonl_batch(k BIGINT, line BLOB): a run of the file's lines, k = the 1-based line
-- number (lines end at '\n' only, as read_json's own; a CRLF's '\r' is JSON whitespace).
-- Output: table jsonl_chunk(k, why, uc): why NULL for a good line, whose [url, caption] is uc
-- (pipeline.ingest stages those rows into a Parquet part, then drops the table); the bad
-- lines' numbers and why appended to jsonl_bad.
-- A line's fate must be the one read_json gives it, so that a file's rows don't depend on
-- whether another line of it is broken: read_json skips blank lines and reads a `null` line
-- as a record of NULLs; it refuses non-UTF-8 text, malformed JSON, a value that is not an
-- object, and an object with a repeated key. Values: json_extract_string renders a
-- non-string value as JSON text, as read_json does for a VARCHAR column.
CREATE OR REPLACE TEMP TABLE jsonl_chunk AS
WITH decoded AS (
    SELECT k, try(decode(line)) AS text FROM jsonl_batch
), keyed AS (
    -- json_valid first: try(json_keys(...)) on a malformed line turns its whole vector into
    -- row-at-a-time evaluation (measured 6x slower on a file of bad lines)
    SELECT k, text, CASE WHEN json_valid(text) THEN json_keys(text) END AS keys FROM decoded
), judged AS (
    SELECT k, text, CASE
        WHEN text IS NULL THEN 'not valid UTF-8'
        WHEN keys IS NULL THEN
            CASE WHEN trim(text, E' \t\r\n') = '' THEN '' ELSE 'not valid JSON' END
        -- valid JSON that starts with '{' is an object: json_type is asked only otherwise
        WHEN NOT prefix(text, '{') AND json_type(text) NOT IN ('OBJECT', 'NULL') THEN
            'a JSON ' || CASE json_type(text) WHEN 'ARRAY' THEN 'array'
                                              WHEN 'VARCHAR' THEN 'string'
                                              WHEN 'BOOLEAN' THEN 'boolean'
                                              ELSE 'number' END || ', not an object'
        WHEN len(keys) <> len(list_distinct(keys)) THEN 'an object with a repeated key'
    END AS why
    FROM keyed
)
SELECT k, why,
    CASE WHEN why IS NULL THEN json_extract_string(text, [$url_key, $caption_key]) END AS uc
FROM judged;

-- why = '': a blank line, which is no row (read_json skips it too)
INSERT INTO jsonl_bad SELECT $file_id, k, why FROM jsonl_chunk WHERE why <> '';
