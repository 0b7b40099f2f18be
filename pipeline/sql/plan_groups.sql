-- witforge plan: how a dedup stage's duplicates grow with its input, fit on the pilot's own
-- rows (pipeline/plan_keep.py). Every row of the stage (kept + dropped) with its group: a
-- dropped duplicate's group is the uid its detail names (the kept row it duplicated), or its
-- own uid (ingest's exact repeats share the kept row's uid); rows dropped for any other
-- reason are left out (they scale with the rows). For the whole stage and for 8 random halves
-- of it (a row's half drawn from its file, position and the seed): rows and distinct groups.
-- {kept}, {dropped}: the stage's Parquet files; {reasons}: the duplicate reasons, quoted.
WITH all_rows AS (
  SELECT 'k' AS src, file_row_number AS pos, uid, NULL::VARCHAR AS reason,
         NULL::VARCHAR AS dup_of
  FROM read_parquet('{kept}', file_row_number = true)
  UNION ALL
  SELECT 'd', file_row_number, uid, reason, nullif(regexp_extract(detail, '[0-9a-f]{{32}}'), '')
  FROM read_parquet('{dropped}', file_row_number = true)
), grouped AS (
  SELECT src, pos, CASE WHEN reason IS NULL THEN uid ELSE coalesce(dup_of, uid) END AS grp
  FROM all_rows WHERE reason IS NULL OR reason IN ({reasons})
)
SELECT -1 AS seed, count(*) AS n, count(DISTINCT grp) AS g FROM grouped
UNION ALL
SELECT s.seed, count(*), count(DISTINCT grp)
FROM grouped, range(8) s(seed)
WHERE hash(src, pos, s.seed, 'witforge-plan') % 2 = 0
GROUP BY s.seed
ORDER BY seed
