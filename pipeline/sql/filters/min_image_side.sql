-- DataComp "basic": the image's shorter side, before img2dataset resized it, is at least
-- image_filter.min_side pixels (default 200). A missing size gives NULL and so drops.
coalesce(original_width, width) >= getvariable('min_side')
AND coalesce(original_height, height) >= getvariable('min_side')
