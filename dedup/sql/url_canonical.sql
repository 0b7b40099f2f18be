-- canonical_url(url, strip): the URL a duplicate check should compare.
--   scheme and authority lower-cased; default ports (:80 for http, :443 for https) and an
--   empty port removed; an empty path becomes '/'; the fragment dropped; query parameters
--   whose name (case-insensitive) is in the list `strip` removed, empty parameters ('&&')
--   removed, and a query left empty loses its '?'. Parameter order is kept: ?a=1&b=2 and
--   ?b=2&a=1 may be different resources on some servers.
-- A URL without '?', '#', ':port', upper case in scheme/authority or an empty path is already
-- canonical; the fast path returns it without the regular expression (most web URLs).
CREATE OR REPLACE TEMP MACRO canonical_url_slow(u, strip) AS (
    WITH p AS (
        SELECT regexp_extract(u, '^([^:/?#]+)://([^/?#]*)([^?#]*)(?:\?([^#]*))?',
                              ['scheme', 'auth', 'path', 'query']) AS g
    ), q AS (
        SELECT lower(g.scheme) AS scheme,
               regexp_replace(lower(g.auth),
                   CASE lower(g.scheme) WHEN 'http' THEN ':(80)?$'
                                        WHEN 'https' THEN ':(443)?$' ELSE ':$' END, '') AS auth,
               CASE WHEN g.path = '' THEN '/' ELSE g.path END AS path,
               list_filter(string_split(g.query, '&'),
                           lambda x: x <> '' AND NOT list_contains(strip,
                                                              lower(split_part(x, '=', 1))))
                   AS params
        FROM p
    )
    SELECT CASE WHEN scheme = '' THEN u  -- not a URL we can parse: compare it as it is
                ELSE scheme || '://' || auth || path
                     || CASE WHEN len(params) > 0 THEN '?' || array_to_string(params, '&')
                             ELSE '' END
           END
    FROM q
);

CREATE OR REPLACE TEMP MACRO canonical_url(u, strip) AS
    CASE WHEN regexp_matches(u, '[?#]|^[^/]*[A-Z]|^[^:/]*://[^/]*([A-Z:]|$)')
         THEN canonical_url_slow(u, strip) ELSE u END;
