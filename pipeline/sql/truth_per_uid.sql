-- One truth row per uid. Exact repeats of a row (same url and caption) share its uid; ingest
-- keeps one and drops the rest, so the uid's kind is the original's, not 'repeat_*'.
-- $truth: the demo manifests' truth.parquet (one row per manifest row).
SELECT uid,
       arg_min(kind, (kind LIKE 'repeat_%', source, url)) AS kind,
       arg_min(aligned, (kind LIKE 'repeat_%', source, url)) AS aligned,
       arg_min(image_id, (kind LIKE 'repeat_%', source, url)) AS image_id,
       arg_min(source_image_id, (kind LIKE 'repeat_%', source, url)) AS source_image_id,
       count(*) AS manifest_rows
FROM read_parquet($truth)
GROUP BY uid
ORDER BY uid
