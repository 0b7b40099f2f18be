-- Where each kind of row ended: per stage, how many rows of the kind reached it and how many it
-- dropped. A row reaches a stage when no earlier stage dropped it.
-- $truth: one row per uid (truth_per_uid.sql); $dropped: every stage's dropped rows with the
-- stage's position (uid, stage, position); $stages: (stage, position) of the finished stages.
WITH fate AS (
    SELECT t.uid, coalesce(t.kind, 'clean') AS kind, d.stage, d.position
    FROM read_parquet($truth) t
    LEFT JOIN dropped d USING (uid)
)
SELECT s.stage, s.position, f.kind,
       count(*) FILTER (WHERE f.position IS NULL OR f.position >= s.position) AS reached,
       count(*) FILTER (WHERE f.position = s.position) AS dropped
FROM stages s CROSS JOIN fate f
GROUP BY s.stage, s.position, f.kind
ORDER BY s.position, f.kind
