-- canonical_url(url, strip): the URL a duplicate check should compare.
--   scheme and authority lower-cased; default ports (:80 for http, :443 for https) and an
--   empty port removed; an empty path becomes '/'; the fragment dropped; query parameters
--   whose name (case-insensitive) is in the list `strip` removed, empty parameters ('&&')
--   removed, and a query left empty loses its '?'. Parameter order is kept: ?a=1&b=2 and
--   ?b=2&a=1 may be different resources on some servers.
-- A URL without '?', '#', ':port', upper case in scheme/authority or an empty path is already
-- canonical; the fast path returns it without the regular expression (most web URLs).
-- Plain nested expressions, no subquery: a scalar subquery in a macro becomes a correlated
-- join per row and ran 30x slower.
CREATE OR REPLACE TEMP MACRO url_part(u, part) AS
    regexp_extract(u, '^([^:/?#]+)://([^/?#]*)([^?#]*)(?:\?([^#]*))?', part);

CREATE OR REPLACE TEMP MACRO url_query(q, strip) AS
    list_filter(string_split(q, '&'),
                lambda x: x <> '' AND NOT list_contains(strip, lower(split_part(x, '=', 1))));

CREATE OR REPLACE TEMP MACRO canonical_url_slow(u, strip) AS
    CASE WHEN url_part(u, 1) = '' THEN u  -- not a URL we can parse: compare it as it is
    ELSE lower(url_part(u, 1)) || '://'
         || regexp_replace(lower(url_part(u, 2)),
                CASE lower(url_part(u, 1)) WHEN 'http' THEN ':(80)?$'
                                           WHEN 'https' THEN ':(443)?$' ELSE ':$' END, '')
         || CASE WHEN url_part(u, 3) = '' THEN '/' ELSE url_part(u, 3) END
         || CASE WHEN len(url_query(url_part(u, 4), strip)) > 0
                 THEN '?' || array_to_string(url_query(url_part(u, 4), strip), '&')
                 ELSE '' END
    END;

CREATE OR REPLACE TEMP MACRO canonical_url(u, strip) AS
    CASE WHEN regexp_matches(u, '[?#]|^[^/]*[A-Z]|^[^:/]*://[^/]*([A-Z:]|$)')
         THEN canonical_url_slow(u, strip) ELSE u END;
