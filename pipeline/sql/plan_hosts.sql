-- witforge plan: rows per host of the crawl's input (the guard's per-domain key: the host name
-- lower-cased, without brackets, port, user info or a trailing dot), most rows first.
-- {input}: the crawl stage's input Parquet.
WITH hosts AS (
  SELECT rtrim(lower(regexp_extract(url,
           '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?\[?([^\]/?#]*?)\]?(?::[0-9]*)?(?:[/?#]|$)',
           1)), '.') AS host
  FROM read_parquet('{input}')
)
SELECT host, count(*) AS n FROM hosts GROUP BY host ORDER BY n DESC, host
