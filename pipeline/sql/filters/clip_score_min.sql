-- LAION's rule: keep pairs whose image-caption cosine (clip_score) is at least
-- clip_filter.min_clip_score (0.28 for OpenAI ViT-B/32 as LAION-2B used it, 0.3 for
-- LAION-400M). A threshold belongs to the model that scored: it does not transfer to another
-- checkpoint, nor to bootstrap's rank-normalised scores (0..1, use clip_score_top there).
clip_score >= getvariable('min_clip_score')
