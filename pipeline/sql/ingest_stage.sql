-- Ingest staging: validate and normalize rows and give each its stable uid. One SELECT that
-- pipeline.ingest streams from a file's reader straight into a Parquet part, so that no table
-- ever holds all the rows (an in-memory table of 100M raw rows spilled 24 GB and grew faster
-- than the rows).
-- Input: relation $src with url_raw, caption_raw (VARCHAR) and the columns named in $extra.
-- Output: uid, url, caption, bad_reason (the first reason that applies; NULL = usable), and,
-- when $keep_raw, url_raw and caption_raw for the rows whose caption ftfy may change (a
-- non-ASCII or control character or a '&': ~3 % of web captions; NULL for the rest):
-- pipeline.ingest repairs those in Python and stages the changed ones again with this query.
WITH cleaned AS (
    SELECT *, regexp_matches(caption_raw, '[^\x20-\x7E]|&') AS special FROM $src
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
        CASE WHEN special THEN regexp_matches(caption_raw, '\s\s|[\t\n\f\r]|^\s|\s$')
             ELSE contains(caption_raw, '  ') OR prefix(caption_raw, ' ')
                  OR suffix(caption_raw, ' ') END AS spaced
    FROM cleaned
), trimmed AS (
    SELECT * EXCLUDE (spaced),
        -- a plain URL has no space to trim (trim copies every string it is given)
        CASE WHEN plain THEN url_raw ELSE trim(url_raw) END AS url_t,
        coalesce(CASE WHEN spaced THEN trim(regexp_replace(caption_raw, '\s+', ' ', 'g'))
                      ELSE caption_raw END, '') AS caption
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
    coalesce(url_norm, url_t) AS url, caption, bad_reason$extra,
    CASE WHEN $keep_raw AND special THEN url_raw END AS url_raw,
    CASE WHEN $keep_raw AND special THEN caption_raw END AS caption_raw
FROM judged
