-- For each training row within the distance of any eval image (pairs from the LSH join:
-- a = training row id, b = eval image id), record the closest eval image; ties go to the
-- first by set, tar and key so the detail is the same on every run.
CREATE OR REPLACE TEMP TABLE contaminated AS
SELECT t.uid, e.set_name || '/' || e.tar_rel || ':' || e.key AS detail, p.distance
FROM dc_pairs p
JOIN train_h t ON t.id = p.a
JOIN eval_h e ON e.id = p.b
QUALIFY row_number() OVER (PARTITION BY t.uid
                           ORDER BY p.distance, e.set_name, e.tar_rel, e.key) = 1;
