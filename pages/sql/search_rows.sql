-- One row per embedding, in the embed stage's row order (faiss id = row), joined to the
-- ledger: the stages after embed that dropped the row (at most one: a dropped row goes no
-- further) and the last finished stage's kept rows.
--   emb_rows(uid, row)         the embed folder's uids in part order
--   embedded(...)              the embed stage's kept.parquet (columns normalised by Python)
--   later_dropped(uid, stage, stage_folder, reason, detail)
--   final_kept(uid)
SELECT r.row, r.uid, e.caption, e.url, e.source, e.tar, e.key, e.width, e.height,
       e.clip_score,
       CASE WHEN d.uid IS NOT NULL THEN 'dropped'
            WHEN f.uid IS NOT NULL THEN 'kept'
            ELSE 'unaccounted' END AS status,
       d.stage, d.stage_folder, d.reason, d.detail
FROM emb_rows r
LEFT JOIN embedded e ON e.uid = r.uid
LEFT JOIN later_dropped d ON d.uid = r.uid
LEFT JOIN (SELECT DISTINCT uid FROM final_kept) f ON f.uid = r.uid
ORDER BY r.row
