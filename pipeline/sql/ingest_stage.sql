-- Ingest: validate and normalize every raw row, give it a stable uid, mark exact repeats.
-- Input: table raw(src_order, file_id, url_raw, caption_raw), files(file_id, source, file),
-- special(r, c): the rowid of every caption with a character outside printable ASCII or a '&'
-- (~3 % of web captions), and that caption after ftfy (pipeline.ingest.mark_special_captions).
-- A row's fate is the first reason that applies; NULL reason = kept.
CREATE OR REPLACE TEMP TABLE staged AS
WITH cleaned AS (
    SELECT src_order, file_id, url_raw, coalesce(s.c, raw.caption_raw) AS caption_fixed,
           s.r IS NOT NULL AS special
    FROM raw LEFT JOIN special s ON raw.rowid = s.r
), parsed AS (
    SELECT *,
        -- A plain URL: lower-case http(s), optional userinfo, a valid lower-case host name,
        -- an optional port, and no whitespace or control character anywhere. It is valid and
        -- its own normal form, so none of the cutting below is done for it (most web URLs;
        -- the cuts, the trim and the character check cost ~4x this one match).
        coalesce(regexp_full_match(url_raw, '^https?://(?:[^@/?#A-Z\x00-\x20\x7F]*@)?[a-z0-9_]'
            || '(?:[a-z0-9_.\-]*[a-z0-9_.])?(?::[^@/?#A-Z\x00-\x20\x7F]*)?'
            || '(?:[/?#][^\x00-\x20\x7F]*)?'), false) AS plain,
        -- Only captions with a whitespace run, a tab/newline or a space at an end change.
        -- A caption outside `special` is printable ASCII, where the only whitespace is ' ':
        -- plain string tests answer for it (the regex costs ~3x them).
        CASE WHEN special THEN regexp_matches(caption_fixed, '\s\s|[\t\n\f\r]|^\s|\s$')
             ELSE contains(caption_fixed, '  ') OR prefix(caption_fixed, ' ')
                  OR suffix(caption_fixed, ' ') END AS spaced
    FROM cleaned
), trimmed AS (
    SELECT * EXCLUDE (url_raw, caption_fixed, spaced),
        -- a plain URL has no space to trim (trim copies every string it is given)
        CASE WHEN plain THEN url_raw ELSE trim(url_raw) END AS url_t,
        coalesce(CASE WHEN spaced THEN trim(regexp_replace(caption_fixed, '\s+', ' ', 'g'))
                      ELSE caption_fixed END, '') AS caption
    FROM parsed
), split AS (
    SELECT *,
        CASE WHEN plain THEN CASE WHEN prefix(url_t, 'https') THEN 'https' ELSE 'http' END
             ELSE lower(regexp_extract(url_t, '^([A-Za-z][A-Za-z0-9+.\-]*):', 1)) END AS scheme,
        CASE WHEN NOT plain
             THEN regexp_extract(url_t, '^[A-Za-z][A-Za-z0-9+.\-]*://([^/?#]*)', 1) END
            AS authority
    FROM trimmed
), hosted AS (
    SELECT *,
        -- host without userinfo and port; IPv6 literals keep their brackets
        CASE WHEN NOT plain
             THEN regexp_extract(authority, '^(?:[^@]*@)?(\[[0-9A-Fa-f:.]+\]|[^:]*)', 1) END
            AS host
    FROM split
), judged AS (
    SELECT *,
        CASE WHEN plain THEN url_t
             ELSE scheme || '://' || lower(authority) || regexp_extract(
                 url_t, '^[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*((?s:.*))$', 1)
        END AS url_norm,
        CASE
            -- a plain URL is http(s), has a host and no bad character: only its length counts
            WHEN plain THEN CASE WHEN length(url_t) > $max_url_length THEN 'url_too_long' END
            WHEN url_t IS NULL OR url_t = '' THEN 'missing_url'
            WHEN scheme NOT IN ('http', 'https') THEN 'bad_url_scheme'
            WHEN length(url_t) > $max_url_length THEN 'url_too_long'
            WHEN regexp_matches(url_t, '[\s\x00-\x1F\x7F]') THEN 'bad_url_chars'
            WHEN host = '' OR NOT regexp_matches(
                host, '^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_](?:[A-Za-z0-9_\-.]*[A-Za-z0-9_.])?)$')
                THEN 'bad_url_host'
            ELSE NULL
        END AS bad_reason
    FROM hosted
)
SELECT
    md5(coalesce(url_norm, coalesce(url_t, '')) || chr(31) || caption) AS uid,
    coalesce(url_norm, url_t) AS url, caption, src_order, file_id, bad_reason
FROM judged;

-- Keep one copy of the data alive at a time: this is what bounds ingest's peak memory.
DROP TABLE raw;

-- Only uids seen more than once need ranking: a narrow group-by finds them, and the window
-- runs on those rows alone instead of on every row with every column. A table, not a view:
-- the kept and the dropped output both read it.
CREATE OR REPLACE TEMP TABLE repeats AS
-- Rows already dropped for a bad URL take no part: a pair is never a repeat of a dropped row.
WITH repeated AS (
    SELECT uid FROM staged WHERE bad_reason IS NULL GROUP BY uid HAVING count(*) > 1
)
SELECT rowid AS r, row_number() OVER (PARTITION BY uid ORDER BY src_order, file_id) AS rn
FROM staged WHERE bad_reason IS NULL AND uid IN (SELECT uid FROM repeated);

CREATE OR REPLACE TEMP VIEW fated AS
SELECT s.*, files.source, files.file,
    CASE
        WHEN bad_reason IS NOT NULL THEN bad_reason
        -- Exact repeats of (url, caption): the first source in build order keeps the pair.
        WHEN repeats.rn > 1 THEN 'exact_repeat'
        ELSE NULL
    END AS reason
FROM staged s LEFT JOIN repeats ON s.rowid = repeats.r JOIN files USING (file_id);
