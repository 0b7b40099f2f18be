-- Per-entry match counts over the whole pool, and for every matched uid the counts of its
-- entries (lowest first), so that choosing t from a target size scans one row per pair
-- instead of joining every match again. Needs view matches(uid, entry_id).
CREATE OR REPLACE TEMP TABLE entry_counts AS
SELECT entry_id, count(*) AS n FROM matches GROUP BY entry_id;

CREATE OR REPLACE TEMP TABLE count_sets AS
SELECT list(c.n ORDER BY c.n) AS ns
FROM matches m JOIN entry_counts c USING (entry_id)
GROUP BY m.uid;
