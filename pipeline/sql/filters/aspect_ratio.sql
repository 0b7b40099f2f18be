-- DataComp "basic": longer side / shorter side is at most image_filter.max_aspect_ratio
-- (default 3), on the original size. Written as products so a zero side is FALSE rather
-- than a division error; a missing size gives NULL and so drops.
coalesce(original_width, width) > 0 AND coalesce(original_height, height) > 0
AND coalesce(original_width, width)
    <= getvariable('max_aspect_ratio') * coalesce(original_height, height)
AND coalesce(original_height, height)
    <= getvariable('max_aspect_ratio') * coalesce(original_width, width)
