-- Split the robots stage's input by the per-URL verdicts computed in pipeline/robots.py.
--   {input}  the upstream kept.parquet      {drops}  (uid, reason, detail) of refused rows
--   {kept}   kept.parquet to write          {dropped} dropped.parquet to write
COPY (
    SELECT i.* FROM read_parquet('{input}') i
    ANTI JOIN read_parquet('{drops}') d ON d.uid = i.uid
    ORDER BY i.uid
) TO '{kept}' (FORMAT parquet);

COPY (
    SELECT uid, 'robots' AS stage, reason, detail FROM read_parquet('{drops}') ORDER BY uid
) TO '{dropped}' (FORMAT parquet);
