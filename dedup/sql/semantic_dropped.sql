-- One row per semantic duplicate (table sem_drop(uid, detail) from the greedy); detail names
-- the kept row it is closest to and their cosine.
SELECT uid, $stage AS stage, 'semantic_duplicate' AS reason, detail
FROM sem_drop
ORDER BY uid
