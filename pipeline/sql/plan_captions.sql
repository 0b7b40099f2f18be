-- witforge plan: ingest's ftfy keys (plan_growth.sql): the captions ingest runs through ftfy,
-- those with a character outside printable ASCII or a '&' (as ingest_stage.sql keeps them
-- raw); ftfy runs once per distinct one. {input}: ingest's kept rows.
SELECT file_row_number AS pos,
       CASE WHEN regexp_matches(caption, '[^\x20-\x7E]|&') THEN caption END AS key
FROM read_parquet('{input}', file_row_number = true)
