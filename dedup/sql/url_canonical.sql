-- canonical: a SELECT over relation {src} (with a column url) adding column canon, the URL a
-- duplicate check compares — or NULL when url is already canonical (most web URLs):
--   scheme and authority lower-cased; default ports (:80 for http, :443 for https) and an
--   empty port removed; an empty path becomes '/'; the fragment dropped; query parameters
--   whose name (case-insensitive) is in {strip} removed, empty parameters ('&&') removed, and
--   a query left empty loses its '?'. Parameter order and path case are kept: ?a=1&b=2 and
--   ?b=2&a=1 may be different resources on some servers.
-- Only URLs with '?', '#', upper case before the path, a ':port' or no path take the slow
-- path, which parses the URL once with one regular expression (CASE evaluates it only for
-- those rows).
WITH _c0 AS (
    SELECT *,
        CASE WHEN regexp_matches(url, '[?#]|^[^/]*[A-Z]|^[^:/]*://[^/]*([A-Z:]|$)')
             THEN regexp_extract(url, '^([^:/?#]+)://([^/?#]*)([^?#]*)(?:\?([^#]*))?',
                                 ['scheme', 'auth', 'path', 'query'])
        END AS _g
    FROM {src}
), _c1 AS (
    SELECT * EXCLUDE (_g), lower(_g.scheme) AS _s, _g.auth AS _a, _g.path AS _p,
        CASE WHEN _g.query <> '' THEN list_filter(string_split(_g.query, '&'),
            lambda x: x <> '' AND NOT list_contains({strip}, lower(split_part(x, '=', 1))))
        END AS _q
    FROM _c0
)
SELECT * EXCLUDE (_s, _a, _p, _q),
    CASE WHEN _s IS NULL OR _s = '' THEN NULL  -- canonical already, or not parseable as a URL
    ELSE _s || '://'
         -- string tests, not a regexp_replace whose pattern varies by row (compiled per row)
         || CASE WHEN _s = 'http' AND suffix(_a, ':80') THEN lower(_a[:-4])
                 WHEN _s = 'https' AND suffix(_a, ':443') THEN lower(_a[:-5])
                 WHEN suffix(_a, ':') THEN lower(_a[:-2])
                 ELSE lower(_a) END
         || CASE WHEN _p = '' THEN '/' ELSE _p END
         || CASE WHEN len(_q) > 0 THEN '?' || array_to_string(_q, '&') ELSE '' END
    END AS canon
FROM _c1
