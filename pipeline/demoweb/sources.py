"""Readers for the offline image sources of the demo pool (Debian packages).

Each reader lists `Candidate`s (cheap: file names and captions only); `render` turns one
candidate into image bytes. Captions are the packages' own text, noisy like real alt-text:
openclipart titles (often Italian, often "gramastar"), the emoji package's CLDR names, and
Tux Paint's one English sentence per stamp.
"""

from __future__ import annotations

import hashlib
import html
import io
import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

OPENCLIPART_ROOT = Path("/usr/share/openclipart")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
TUXPAINT_ROOT = Path("/usr/share/tuxpaint/stamps")

LICENSES = {
    "openclipart": "public-domain (Open Clip Art Library, Debian openclipart-png)",
    "emoji": "OFL-1.1 font / Apache-2.0 images (Noto Color Emoji, Debian fonts-noto-color-emoji)",
    "tuxpaint": "GPL-2+ (Tux Paint stamps, Debian tuxpaint-stamps-default)",
}
# The Noto font is a CBDT bitmap font: it only renders at its native strike size.
EMOJI_SIZE = 109


@dataclass(frozen=True)
class Candidate:
    image_id: str
    origin: str
    category: str
    caption: str
    src: str  # a file path, or the emoji sequence itself for origin "emoji"

    @property
    def license(self) -> str:
        return LICENSES[self.origin]


def _short_hash(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()[:12]


def _words_from_filename(stem: str) -> str:
    return re.sub(r"[_\-\s]+", " ", stem).strip()


_TITLE = re.compile(r"<dc:title>([^<]*)</dc:title>")
_DESC = re.compile(r"<dc:description>([^<]*)</dc:description>")


def svg_caption(svg: Path, fallback: str) -> str:
    """The work's dc:title (plus a short real dc:description), as an uploader's alt-text."""
    try:
        head = svg.read_bytes()[:65536].decode("utf-8", "replace")
    except OSError:
        return fallback
    title = _TITLE.search(head)
    text = html.unescape(title.group(1)).strip() if title else ""
    desc = _DESC.search(head)
    d = html.unescape(desc.group(1)).strip() if desc else ""
    if d and d.lower() != text.lower() and len(d) < 120 and "inkscape" not in d.lower():
        text = f"{text}: {d}" if text else d
    return " ".join(text.split()) or fallback


def openclipart_candidates(root: Path = OPENCLIPART_ROOT) -> list[Candidate]:
    png_root = root / "png"
    if not png_root.is_dir():
        return []
    out = []
    for png in sorted(png_root.rglob("*.png")):
        if png.is_symlink():  # the package links one file into several categories
            continue
        rel = png.relative_to(png_root)
        caption = svg_caption((root / "svg" / rel).with_suffix(".svg"),
                              _words_from_filename(png.stem))
        out.append(Candidate(f"oc-{_short_hash(rel.as_posix())}", "openclipart",
                             f"openclipart/{rel.parts[0]}", caption, str(png)))
    return out


def tuxpaint_candidates(root: Path = TUXPAINT_ROOT) -> list[Candidate]:
    """Stamps with a PNG and a .txt whose first line is the English description."""
    if not root.is_dir():
        return []
    out = []
    for txt in sorted(root.rglob("*.txt")):
        png = txt.with_suffix(".png")
        if not png.is_file():  # SVG-only stamps would need an SVG renderer; skipped
            continue
        lines = [ln.strip() for ln in txt.read_text("utf-8", "replace").splitlines()]
        caption = next((ln for ln in lines if ln and "=" not in ln[:12]), "")
        if not caption:
            continue
        rel = png.relative_to(root)
        out.append(Candidate(f"tp-{_short_hash(rel.as_posix())}", "tuxpaint",
                             f"tuxpaint/{rel.parts[0]}", caption, str(png)))
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _emoji_groups(test_file: Path) -> dict[str, str]:
    """emoji -> 'group-slug/subgroup' from Unicode's emoji-test.txt (Debian unicode-data)."""
    groups: dict[str, str] = {}
    if not test_file.is_file():
        return groups
    group = sub = ""
    for line in test_file.read_text("utf-8").splitlines():
        if line.startswith("# group:"):
            group = _slug(line.split(":", 1)[1])
        elif line.startswith("# subgroup:"):
            sub = _slug(line.split(":", 1)[1])
        elif line and not line.startswith("#") and "; fully-qualified" in line:
            seq = "".join(chr(int(cp, 16)) for cp in line.split(";")[0].split())
            groups[seq] = f"{group}/{sub}"
    return groups


# Coarse fallback when emoji-test.txt is absent: the Unicode block of the first code point.
_BLOCK_GROUPS = [
    (0x1F1E6, 0x1F1FF, "flags/country-flag"), (0x1F300, 0x1F32F, "travel-places/sky-weather"),
    (0x1F330, 0x1F344, "animals-nature/plant"), (0x1F345, 0x1F37F, "food-drink/food"),
    (0x1F380, 0x1F3FF, "activities/event"), (0x1F400, 0x1F43F, "animals-nature/animal"),
    (0x1F440, 0x1F4FF, "objects/object"), (0x1F500, 0x1F5FF, "symbols/symbol"),
    (0x1F600, 0x1F64F, "smileys-emotion/face"), (0x1F680, 0x1F6FF, "travel-places/transport"),
    (0x1F900, 0x1F9FF, "people-body/supplemental"), (0x1FA70, 0x1FAFF, "objects/object"),
]


def _block_group(seq: str) -> str:
    cp = ord(seq[0])
    return next((g for lo, hi, g in _BLOCK_GROUPS if lo <= cp <= hi), "symbols/other")


def emoji_name(seq: str) -> str:
    import emoji

    data = emoji.EMOJI_DATA.get(seq)
    if data:
        return data["en"].strip(":").replace("_", " ")
    return unicodedata.name(seq[0], "").lower() if len(seq) == 1 else ""


def emoji_candidates(font: Path = EMOJI_FONT, test_file: Path = EMOJI_TEST) -> list[Candidate]:
    """Fully-qualified emoji (no skin-tone variants, no components) with their CLDR names."""
    import emoji

    if not font.is_file():
        return []
    groups = _emoji_groups(test_file)
    if groups:
        seqs = sorted(groups)
    else:
        seqs = sorted(e for e, d in emoji.EMOJI_DATA.items()
                      if d["status"] == emoji.STATUS["fully_qualified"])
    out = []
    for seq in seqs:
        category = groups.get(seq) or _block_group(seq)
        name = emoji_name(seq)
        if not name or "skin tone" in name or category.startswith("component"):
            continue
        sub = category.split("/", 1)[1]
        cid = "em-" + "-".join(f"{ord(c):x}" for c in seq if ord(c) != 0xFE0F)
        out.append(Candidate(cid, "emoji", f"emoji/{sub}", name, seq))
    return out


def _flatten(im: Image.Image) -> Image.Image:
    """Transparent cut-outs on white, as a web page would show them (RGB keeps CLIP sane)."""
    if im.mode in ("P", "LA", "L") or "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im.convert("RGB")


def _render_emoji(seq: str, font_path: Path) -> Image.Image | None:
    font = ImageFont.truetype(str(font_path), EMOJI_SIZE)
    canvas = Image.new("RGBA", (EMOJI_SIZE * 3, EMOJI_SIZE * 2), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((EMOJI_SIZE // 2, EMOJI_SIZE // 4), seq, font=font,
                                embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    w, h = box[2] - box[0], box[3] - box[1]
    if w > 1.4 * h:  # a sequence the font (or layout engine) could not join: two glyphs
        return None
    return canvas.crop(box)


MAX_SOURCE_PIXELS = 40_000_000


def render(c: Candidate, max_side: int, font_path: Path = EMOJI_FONT) -> tuple[bytes, str] | None:
    """Image bytes and extension ('png' for clip art, 'jpg' otherwise); None if unusable."""
    if c.origin == "emoji":
        im = _render_emoji(c.src, font_path)
        if im is None:
            return None
    else:
        with warnings.catch_warnings():
            # a few openclipart PNGs are 100-620 Mpixel posters: decoding one takes seconds
            # and ~700 MB for a 256 px thumbnail; they are left out (PIL warns on them, and
            # refuses to open those over 2x its limit)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                src = Image.open(c.src)
            except Image.DecompressionBombError:  # over 2x PIL's limit: it refuses to open
                return None
        with src:
            if src.width * src.height > MAX_SOURCE_PIXELS:
                return None
            src.load()
            im = src.copy()
    im = _flatten(im)
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    if min(im.size) < 8:
        return None
    buf = io.BytesIO()
    if c.origin == "openclipart":
        im.save(buf, "PNG")
        return buf.getvalue(), "png"
    im.save(buf, "JPEG", quality=88)
    return buf.getvalue(), "jpg"
