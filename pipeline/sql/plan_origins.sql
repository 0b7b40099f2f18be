-- witforge plan: the robots stage's keys (plan_growth.sql): each row's origin,
-- scheme://host[:port], one robots.txt fetch each. {input}: the stage's input.
SELECT file_row_number AS pos,
       lower(regexp_extract(url, '^([A-Za-z][A-Za-z0-9+.-]*://[^/?#]*)', 1)) AS key
FROM read_parquet('{input}', file_row_number = true)
