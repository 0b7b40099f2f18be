-- Each cluster (a connected component of pairs within the distance, table comp(id, root)
-- holding only the clustered values) keeps its smallest uid; every other row records it.
CREATE OR REPLACE TEMP TABLE near_drop AS
SELECT r.uid, coalesce(k.rep, v.rep) AS kept_uid
FROM readable r
JOIN hv v ON r.phash = v.h
LEFT JOIN comp c ON c.id = v.id
LEFT JOIN hv k ON k.id = c.root
WHERE r.uid NOT IN (SELECT uid FROM sha_drop)
  AND r.uid <> coalesce(k.rep, v.rep);
