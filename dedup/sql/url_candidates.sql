-- url_dedup, step 2 of 3: the strings of every row whose hash repeats (the candidates),
-- with the hash part each belongs to. Equal (canonical url, caption) pairs have equal
-- hashes, so the exact comparison of step 3 can run one part at a time, each part small
-- enough for memory: at 96M rows the 16.6M candidates' strings in one aggregate spilled
-- 2.5 GB. With more than one part this query is written once to Parquet, split by part.
-- Placeholders: input = the input path, parts = the number of parts.
SELECT k.rn, i.uid, k.url_len, coalesce(k.canon, i.url) AS canon, i.caption,
       k.h % {parts} AS part
FROM url_keys k SEMI JOIN url_repeated r ON k.h = r.h
JOIN read_parquet({input}, file_row_number = true) i ON i.file_row_number = k.rn
