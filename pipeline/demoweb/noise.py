"""The demo web's image noise: near-duplicate copies of pool images and placeholder images.

Near-duplicates are what reposting sites make of a picture: resized, re-encoded at a low JPEG
quality, cropped, mirrored, framed, watermarked, colour-shifted. Each copy is drawn from its
source by `derive` with parameters fixed by its id, written once to `<pool>/derived/<id>.jpg`
and listed in `<pool>/derived.parquet` (image_id, file, source_image_id, transform, params,
width, height, sha256), which the demo web serves from like the pool's own images.

Placeholders are the few images a site serves for every picture it has lost ("image not
found", a grey "no photo" box, a tiny flag icon): the same bytes under hundreds of URLs. The
demo web renders them itself (`placeholder_images`); `ensure_derived` also writes them to
`<pool>/derived/` so readers of the truth table can open them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont, ImageOps

# Every copy kind; pHash (dedup/phash.py, distance <= 4) is meant to catch resize, jpeg,
# watermark and miss crop, flip, border, colour: later stages are measured on the difference.
TRANSFORMS = ["resize", "jpeg", "crop", "flip", "border", "watermark", "colour"]
WATERMARKS = ["© stockpix", "SAMPLE", "clipart-free.example", "shutterfoto", "preview"]
BORDER_COLOURS = [(255, 255, 255), (0, 0, 0), (228, 228, 228), (40, 60, 120), (150, 20, 30)]
# placeholder id -> what the picture shows (its own caption in the truth table)
PLACEHOLDERS = {
    "ph-notfound": "an 'image not found' placeholder graphic",
    "ph-nophoto": "a grey 'no photo' placeholder box",
    "ph-flag": "a tiny flag icon",
}
# Shares of the lost pictures each placeholder stands in for, in tenths (5:3:2).
_PLACEHOLDER_TENTHS = [("ph-notfound", 5), ("ph-nophoto", 3), ("ph-flag", 2)]
DERIVED_COLUMNS = ["image_id", "file", "source_image_id", "transform", "params", "width",
                   "height", "sha256"]


@dataclass(frozen=True)
class Copy:
    """One near-duplicate to make: `transform` of pool image `source_id` with parameter `p`."""
    source_id: str
    source_file: str  # relative to the pool folder
    transform: str
    p: int  # a hash-drawn integer the transform turns into its own settings

    @property
    def image_id(self) -> str:
        key = f"{self.source_id}|{self.transform}|{self.p}"
        return "dv-" + hashlib.md5(key.encode()).hexdigest()[:12]


def placeholder_of(image_id: str) -> str:
    """The placeholder a lost picture is replaced by: a hash of its id alone, so that the
    demo web (which knows no seed) serves the one the manifests' truth table names."""
    h = int(hashlib.md5(f"placeholder:{image_id}".encode()).hexdigest()[:8], 16) % 10
    for pid, tenths in _PLACEHOLDER_TENTHS:
        if h < tenths:
            return pid
        h -= tenths
    raise AssertionError("placeholder shares must sum to 10")


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@lru_cache(maxsize=1)
def placeholder_images() -> dict[str, bytes]:
    """id -> PNG bytes of each placeholder, drawn with Pillow (no file is read)."""
    nf = Image.new("RGB", (200, 150), (245, 245, 245))
    d = ImageDraw.Draw(nf)
    d.rectangle([1, 1, 198, 148], outline=(190, 190, 190), width=2)
    d.rectangle([70, 22, 130, 70], outline=(160, 160, 160), width=3)  # a broken-picture icon
    d.polygon([(74, 66), (92, 44), (104, 58), (112, 50), (126, 66)], fill=(170, 170, 170))
    d.line([(70, 22), (130, 70)], fill=(200, 60, 60), width=3)
    d.text((100, 98), "Image not found", fill=(90, 90, 90), font=_font(16), anchor="mm")
    d.text((100, 122), "The requested image is unavailable", fill=(140, 140, 140),
           font=_font(10), anchor="mm")
    nophoto = Image.new("RGB", (160, 160), (204, 204, 204))
    d = ImageDraw.Draw(nophoto)
    d.text((80, 80), "NO PHOTO", fill=(150, 150, 150), font=_font(20), anchor="mm")
    flag = Image.new("RGB", (24, 16), (0, 85, 164))  # three stripes, like a country flag icon
    ImageDraw.Draw(flag).rectangle([8, 0, 15, 15], fill=(255, 255, 255))
    ImageDraw.Draw(flag).rectangle([16, 0, 23, 15], fill=(239, 65, 53))
    return {"ph-notfound": _png(nf), "ph-nophoto": _png(nophoto), "ph-flag": _png(flag)}


def _hue_shift(im: Image.Image, shift: int) -> Image.Image:
    h, s, v = im.convert("HSV").split()
    h = h.point(lambda x: (x + shift) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def _watermark(im: Image.Image, text: str, corner: int) -> Image.Image:
    """A small semi-opaque text stamp in one corner, as stock-photo previews carry."""
    size = max(9, min(im.size) // 10)
    font = _font(size)
    layer = Image.new("RGBA", im.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    box = d.textbbox((0, 0), text, font=font)
    tw, th = box[2] - box[0], box[3] - box[1]
    m = max(2, size // 3)
    x = m if corner % 2 == 0 else max(m, im.width - tw - m)
    y = m if corner < 2 else max(m, im.height - th - m)
    d.text((x - box[0], y - box[1]), text, font=font, fill=(255, 255, 255, 170),
           stroke_width=1, stroke_fill=(0, 0, 0, 170))
    return Image.alpha_composite(im.convert("RGBA"), layer).convert("RGB")


def derive(src: Image.Image, transform: str, p: int) -> tuple[bytes, dict]:
    """JPEG bytes of the copy and the settings used (recorded in derived.parquet)."""
    im = src.convert("RGB")
    w, h = im.size
    if transform == "resize":
        f = 0.5 + (p % 26) / 100
        im = im.resize((max(16, round(w * f)), max(16, round(h * f))),
                       Image.Resampling.LANCZOS)
        return _jpeg(im, 85), {"scale": f, "quality": 85}
    if transform == "jpeg":
        q = 10 + p % 16
        return _jpeg(im, q), {"quality": q}
    if transform == "crop":
        fw, fh = 0.70 + (p % 21) / 100, 0.70 + (p // 21 % 21) / 100
        cw, ch = max(8, round(w * fw)), max(8, round(h * fh))
        x, y = (p // 441 % 101) * (w - cw) // 100, (p // 44541 % 101) * (h - ch) // 100
        return _jpeg(im.crop((x, y, x + cw, y + ch)), 90), {
            "box": [x, y, x + cw, y + ch], "quality": 90}
    if transform == "flip":
        return _jpeg(ImageOps.mirror(im), 95), {"mirror": "horizontal", "quality": 95}
    if transform == "border":
        b = max(2, round(min(w, h) * (0.06 + (p % 15) / 100)))
        colour = BORDER_COLOURS[p // 15 % len(BORDER_COLOURS)]
        return _jpeg(ImageOps.expand(im, border=b, fill=colour), 90), {
            "border": b, "colour": list(colour), "quality": 90}
    if transform == "watermark":
        text = WATERMARKS[p % len(WATERMARKS)]
        corner = p // len(WATERMARKS) % 4
        return _jpeg(_watermark(im, text, corner), 90), {
            "text": text, "corner": corner, "quality": 90}
    if transform == "colour":
        shift = 40 + p % 177
        return _jpeg(_hue_shift(im, shift), 90), {"hue_shift": shift, "quality": 90}
    raise ValueError(f"unknown near-duplicate transform {transform!r}; "
                     f"known: {', '.join(TRANSFORMS)}")


def read_derived(pool_dir: Path) -> list[dict]:
    path = Path(pool_dir) / "derived.parquet"
    return pq.read_table(path).to_pylist() if path.is_file() else []


def ensure_derived(pool_dir: Path, copies: list[Copy]) -> dict[str, dict]:
    """Write every copy (and the placeholders) not yet under `<pool>/derived/`, and list them
    in derived.parquet; returns image_id -> row for `copies`.

    derived.parquet keeps the rows of earlier calls too (manifests written with another seed
    or rate name other copies, and a demo web may still serve them), sorted by image_id; a
    copy's bytes depend on its id alone, so a file already there is not written again.
    """
    pool_dir = Path(pool_dir)
    out = pool_dir / "derived"
    out.mkdir(exist_ok=True)
    known = {r["image_id"]: r for r in read_derived(pool_dir)}
    for pid, data in placeholder_images().items():
        f = out / f"{pid}.png"
        if not f.is_file() or f.read_bytes() != data:
            f.write_bytes(data)
        with Image.open(f) as im:
            w, h = im.size
        known[pid] = {"image_id": pid, "file": f"derived/{pid}.png", "source_image_id": None,
                      "transform": "placeholder", "params": json.dumps({}), "width": w,
                      "height": h, "sha256": hashlib.sha256(data).hexdigest()}
    made: dict[str, dict] = {}
    for c in copies:
        row = known.get(c.image_id)
        if row is None or not (pool_dir / row["file"]).is_file():
            with Image.open(pool_dir / c.source_file) as src:
                data, params = derive(src, c.transform, c.p)
            rel = f"derived/{c.image_id}.jpg"
            (pool_dir / rel).write_bytes(data)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
            row = {"image_id": c.image_id, "file": rel, "source_image_id": c.source_id,
                   "transform": c.transform, "params": json.dumps(params, sort_keys=True),
                   "width": w, "height": h, "sha256": hashlib.sha256(data).hexdigest()}
            known[c.image_id] = row
        made[c.image_id] = row
    rows = [known[k] for k in sorted(known)]
    table = pa.Table.from_pylist(rows, schema=pa.schema(
        [("image_id", pa.string()), ("file", pa.string()), ("source_image_id", pa.string()),
         ("transform", pa.string()), ("params", pa.string()), ("width", pa.int64()),
         ("height", pa.int64()), ("sha256", pa.string())]))
    # A running demo web rereads this file when asked for an id it lacks: swap it in whole.
    tmp = pool_dir / f".derived.parquet.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    tmp.replace(pool_dir / "derived.parquet")
    return made
