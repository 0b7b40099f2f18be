"""Small shard sets of drawn shapes for tests and benchmarks (no download, no Debian package).

Each sample is a coloured shape on a light background with a caption naming colour and shape,
written in the shard stage's layout: ``<uid>.jpg``, ``<uid>.txt``, ``<uid>.json`` per sample
and a ``sizes.json`` in open_clip's format.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
           "yellow": (235, 210, 20), "purple": (140, 40, 170), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle")


def draw(colour: str, shape: str, rng: random.Random, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), tuple(rng.randrange(200, 256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    r = rng.randrange(size // 5, size // 3)
    cx, cy = rng.randrange(r, size - r), rng.randrange(r, size - r)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_toy_shards(out_dir: Path, n: int, per_shard: int = 20, seed: int = 0,
                     corrupt: tuple[int, ...] = (), prefix: str = "shard",
                     size: int = 64) -> list[str]:
    """Write ``n`` samples into ``out_dir``; sample indexes in ``corrupt`` get image bytes that
    are not an image. Returns the shard paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = [(c, s) for c in COLOURS for s in SHAPES]
    paths, sizes = [], {}
    for start in range(0, n, per_shard):
        path = out_dir / f"{prefix}-{start // per_shard:06d}.tar"
        with wds.TarWriter(str(path)) as tw:
            for i in range(start, min(n, start + per_shard)):
                colour, shape = names[rng.randrange(len(names))]
                uid = hashlib.md5(f"{seed}:{prefix}:{i}".encode()).hexdigest()
                img = b"\x00not an image" * 10 if i in corrupt else jpeg(
                    draw(colour, shape, rng, size))
                tw.write({"__key__": uid, "jpg": img, "txt": f"a {colour} {shape}",
                          "json": json.dumps({"uid": uid, "i": i}).encode()})
        sizes[path.name] = min(n, start + per_shard) - start
        paths.append(str(path))
    (out_dir / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return paths
