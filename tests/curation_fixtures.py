"""Real files for the image-dedup, decontamination and shard tests.

Images are drawn with Pillow from a seed (random shapes on a random background), so every
test owns distinct, reproducible pictures. ``crawl_run`` lays them out exactly as the crawl
stage leaves them (img2dataset tars ``<key>.jpg/.txt/.json`` under the run folder and a
kept.parquet with tar relative to the run folder, key, sha256, sizes) and marks the upstream
stage done, so the real stage runner can run the stage under test.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline.config import BuildConfig, load_build
from pipeline.stage import STAGES


def drawn_image(seed: int, size: int = 128) -> Image.Image:
    rnd = random.Random(seed)
    img = Image.new("RGB", (size, size), tuple(rnd.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(8):
        x0, y0 = rnd.randrange(size), rnd.randrange(size)
        x1, y1 = x0 + rnd.randrange(10, size), y0 + rnd.randrange(10, size)
        fill = tuple(rnd.randrange(256) for _ in range(3))
        (d.ellipse if rnd.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=fill)
    return img


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def make_build(tmp: Path, extra_yaml: str = "") -> BuildConfig:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "m.csv").write_text("url,caption\nhttp://127.0.0.1/a.jpg,a cat\n")
    (tmp / "b.yaml").write_text(
        f"name: t\nruns_dir: {tmp / 'runs'}\nsources:\n  - path: m.csv\n{extra_yaml}")
    return load_build(tmp / "b.yaml")


def crawl_run(cfg: BuildConfig, samples: list[tuple[str, str, bytes | None]],
              upstream: str, per_tar: int = 4) -> list[dict]:
    """Write crawl-style tars + the ``upstream`` stage's kept.parquet for (uid, caption, image).

    ``image=None`` lists the row in kept.parquet without a member in the tar (a lost image).
    """
    images_dir = "06_crawl.work/attempt_000/images"
    rows: list[dict] = []
    for start in range(0, len(samples), per_tar):
        tar_rel = f"{images_dir}/{start // per_tar:05d}.tar"
        members = []
        for i, (uid, caption, data) in enumerate(samples[start:start + per_tar]):
            key = f"{start // per_tar:05d}{i:04d}"
            w = h = None
            if data is not None:
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        w, h = im.size
                except OSError:  # deliberately broken bytes: the crawl would know no size
                    pass
                members += [(f"{key}.jpg", data), (f"{key}.txt", caption.encode()),
                            (f"{key}.json", json.dumps({"key": key}).encode())]
            rows.append({
                "uid": uid, "url": f"http://127.0.0.1/{uid}.jpg", "caption": caption,
                "source": "test", "status": "success", "width": w, "height": h,
                "original_width": w, "original_height": h,
                "sha256": hashlib.sha256(data).hexdigest() if data is not None else None,
                "tar": tar_rel, "key": key,
            })
        write_tar(cfg.run_dir / tar_rel, members)
    mark_done(cfg, upstream, rows)
    return rows


def mark_done(cfg: BuildConfig, stage: str, rows: list[dict],
              template: dict | None = None) -> None:
    """Make ``stage`` look finished with ``rows`` as its kept.parquet (``template``: a row
    giving the columns when ``rows`` is empty)."""
    spec = next(s for s in STAGES if s.name == stage)
    d = cfg.run_dir / spec.folder
    d.mkdir(parents=True, exist_ok=True)
    cols = {k: [r[k] for r in rows] for k in (rows[0] if rows else template or {})}
    table = pa.table({k: pa.array(v, pa.uint64() if k == "phash" else
                                  pa.string() if not v else None)
                      for k, v in cols.items()})
    pq.write_table(table, d / "kept.parquet")
    (d / "report.json").write_text(json.dumps({"fingerprint": f"fixture-{len(rows)}",
                                               "kept": len(rows)}))
    (d / "_SUCCESS").write_text("")


def read_parquet(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()
