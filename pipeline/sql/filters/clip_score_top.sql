-- DataComp's CLIP-score top fraction: keep the clip_filter.fraction (0.3) highest-scoring
-- pairs of the whole stage input, one global cut. Exactly: k = ceil(fraction * n) over the
-- n scored rows; the cut is the k-th highest clip_score and every row scoring >= the cut is
-- kept, so ties at the cut all stay (k or more rows). Rows without a score drop.
WITH ranked AS (
    SELECT clip_score,
           row_number() OVER (ORDER BY clip_score DESC) AS r,
           count(*) OVER () AS n
    FROM pairs
    WHERE clip_score IS NOT NULL
),
cut AS (
    SELECT min(clip_score) AS t FROM ranked WHERE r <= ceil(getvariable('fraction') * n)
)
SELECT uid FROM pairs, cut WHERE pairs.clip_score >= cut.t
