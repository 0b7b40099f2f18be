-- Per-entry match counts over the whole pool, and the distinct multisets of counts that the
-- pairs see (with how many pairs see each), so that choosing t from a target size scans a
-- small table instead of every match. Needs view matches(uid, entry_id).
CREATE OR REPLACE TEMP TABLE entry_counts AS
SELECT entry_id, count(*) AS n FROM matches GROUP BY entry_id;

CREATE OR REPLACE TEMP TABLE count_sets AS
SELECT ns, count(*) AS pairs
FROM (SELECT list(c.n ORDER BY c.n) AS ns
      FROM matches m JOIN entry_counts c USING (entry_id)
      GROUP BY m.uid)
GROUP BY ns;
