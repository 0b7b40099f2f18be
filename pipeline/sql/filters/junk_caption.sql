-- Drops captions that say nothing about the image: a bare file name (IMG_1234.jpg,
-- DSC01234, photo-2.png), a URL or web address anywhere, web boilerplate ("click here",
-- "click to enlarge", "image not found"), or only digits, punctuation and symbols.
NOT regexp_matches(caption, '(?i)'
    -- the whole caption is a file name, a camera-style name or has no letters
    || '^\s*(?:[\w\-. ()\[\]]*\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic|svg|avif)'
    || '|(?:img|image|dsc[nf]?|dcim|pxl|photo|pic|screenshot|scan|file)[\s_\-]*\d[\w\-]*'
    || '|[\pP\pS\pN\s]*)\s*$'
    -- a URL anywhere
    || '|(?:https?://|ftp://|\bwww\.[a-z0-9\-]+\.[a-z])'
    -- web boilerplate
    || '|\b(?:click here|click to enlarge|click to view|image not (?:found|available)'
    || '|no image available|image unavailable|placeholder image)\b')
