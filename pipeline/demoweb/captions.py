"""The demo web's caption noise, and the uid ingest gives a (url, caption) row.

Junk captions (file names, boilerplate, empty, non-English, mojibake), template captions of
shops and CMSs ("Product image 3 of 12", "Home | Shop", "SKU 48213-B"), and the decorations
reposting and clip-art sites add to a picture's own caption ("… clipart", "free … png").
Every choice is a hash of (seed, purpose, key), as in manifests.py.
"""

from __future__ import annotations

import hashlib
import re

from pipeline.caption_fix import fix_caption

JUNK_KINDS = ["filename", "boilerplate", "empty", "non_english", "mojibake"]
FILENAMES = ["IMG_2041.JPG", "DSC01234.jpg", "image0001.png", "photo (3).jpeg",
             "Screenshot 2019-03-02 at 10.41.22.png", "P1010037.JPG"]
BOILERPLATE = ["click here", "image", "untitled", "Download", "thumbnail", "logo",
               "Click to enlarge", "null"]
# Used for non-emoji images; emoji use the emoji package's own translations.
NON_ENGLISH = ["Ein schönes Bild für die ganze Familie", "高清图片免费下载", "Картинка для детей",
               "Bild herunterladen", "一只可爱的动物", "Красивая иллюстрация"]
LANGS = ["de", "zh", "ru"]
# Template captions a shop or CMS writes into every alt attribute. The fixed ones repeat
# across many images (frequent-caption territory), weighted so that a few dominate, as
# "photo" and "Home | Shop" do on the web; the numbered ones differ per image.
TEMPLATE_FIXED = [("photo", 8), ("Home | Shop", 5), ("Product image", 3),
                  ("Image may contain: text", 2), ("Buy now | Free shipping", 1),
                  ("Stock photo", 1)]
TEMPLATE_NUMBERED = ["Product image {i} of {n}", "image {k}", "SKU {sku}-{letter}",
                     "Item #{item}", "Gallery photo {i}/{n}"]
# What reposting and clip-art sites make of a picture's own caption.
DECORATIONS = ["{c} clipart", "{c} | free vector", "{c} - stock illustration", "free {c} png",
               "{c} icon", "{c} (image)", "Download {c}", "{c} wallpaper"]


def h(seed: int, purpose: str, key: str) -> int:
    return int(hashlib.md5(f"{seed}:{purpose}:{key}".encode()).hexdigest()[:12], 16)


def mojibake(text: str) -> str:
    """UTF-8 bytes read as Windows-1252: the classic 'cafÃ©' that ftfy repairs."""
    return text.encode("utf-8").decode("cp1252")


def _non_english(seed: int, image_id: str, origin: str) -> tuple[str, bool]:
    """(caption, whether it names the image: the emoji's own translated name does)."""
    if origin == "emoji":
        import emoji

        emoji.config.load_language(LANGS)
        seq = "".join(chr(int(x, 16)) for x in image_id[3:].split("-"))
        data = emoji.EMOJI_DATA.get(seq) or emoji.EMOJI_DATA.get(seq + "\ufe0f") or {}
        name = data.get(LANGS[h(seed, "lang", image_id) % len(LANGS)])
        if name:
            return name.strip(":").replace("_", " "), True
    return NON_ENGLISH[h(seed, "nonen", image_id) % len(NON_ENGLISH)], False


def junk(kind: str, seed: int, row: dict) -> tuple[str, str, bool]:
    """(junk caption, what a repair should give back or '', whether it still describes the
    image: only mojibake of its caption and an emoji's translated name do)."""
    iid = row["image_id"]
    if kind == "filename":
        return FILENAMES[h(seed, kind, iid) % len(FILENAMES)], "", False
    if kind == "boilerplate":
        return BOILERPLATE[h(seed, kind, iid) % len(BOILERPLATE)], "", False
    if kind == "empty":
        return "", "", False
    if kind == "non_english":
        text, names = _non_english(seed, iid, row["origin"])
        return text, "", names
    text = row["caption"] if any(ord(c) > 127 for c in row["caption"]) else \
        f"{row['caption']} – café crème"
    try:
        return mojibake(text), text, True
    except UnicodeDecodeError:  # a byte cp1252 lacks (rare): fall back to a plain case
        text = f"{row['caption']} – café"
        return mojibake(text), text, True


def template(seed: int, image_id: str) -> str:
    """Half the template captions are the fixed, repeated ones; half are numbered."""
    if h(seed, "tmpl-kind", image_id) % 2 == 0:
        total = sum(w for _, w in TEMPLATE_FIXED)
        x = h(seed, "tmpl-fixed", image_id) % total
        for text, w in TEMPLATE_FIXED:
            if x < w:
                return text
            x -= w
    v = h(seed, "tmpl-num", image_id)
    n = 4 + v % 12
    return TEMPLATE_NUMBERED[v % len(TEMPLATE_NUMBERED)].format(
        i=1 + v // 7 % n, n=n, k=1 + v // 11 % 240, sku=10000 + v // 13 % 90000,
        letter="ABCDEFGH"[v // 17 % 8], item=100000 + v // 19 % 900000)


def decorate(seed: int, key: str, caption: str) -> str:
    return DECORATIONS[h(seed, "decor", key) % len(DECORATIONS)].format(c=caption)


def clean_caption(text: str) -> str:
    """A caption as a TSV cell: no tab, no newline, single spaces."""
    return " ".join(text.replace("\t", " ").split())


# --- the uid ingest gives a row (pipeline/ingest.py, pipeline/sql/ingest_stage.sql) -------
_SPECIAL = re.compile(r"[^\x20-\x7E]|&")  # the captions ingest hands to ftfy
_RE2_SPACE = re.compile(r"[\t\n\f\r ]+")  # RE2's \s, which ingest's regexp_replace uses
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*)$", re.DOTALL)


def ingest_caption(caption: str | None) -> str:
    """The caption as ingest stores it: ftfy on captions with a non-ASCII or control
    character or a '&' (ingest.ftfy on, the default), whitespace runs to one space, trimmed."""
    text = caption or ""
    if _SPECIAL.search(text):
        text = fix_caption(text)
    return _RE2_SPACE.sub(" ", text).strip(" ")


def ingest_url(url: str) -> str:
    """Scheme and authority lower-cased, the rest as it is (URLs the demo writes are plain)."""
    m = _URL.match(url.strip())
    return url if m is None else f"{m.group(1).lower()}://{m.group(2).lower()}{m.group(3)}"


def ingest_uid(url: str, caption: str | None) -> str:
    """md5(url + US + caption) after ingest's normalization: the uid every later stage uses."""
    return hashlib.md5(f"{ingest_url(url)}\x1f{ingest_caption(caption)}".encode()).hexdigest()
