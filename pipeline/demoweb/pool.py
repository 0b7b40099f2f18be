"""`witforge demo-data`: assemble the demo pool of real image–caption pairs.

Sources (Debian packages, see sources.py): openclipart-png/-svg, fonts-noto-color-emoji (+ the
PyPI `emoji` names, unicode-data for emoji groups), tuxpaint-stamps-default. Fashion-MNIST is
kept out on purpose: it is the zero-shot eval set and must not leak into training.

Output: <out>/pool/images/<image_id>.<png|jpg>, <out>/pool/pool.parquet (image_id, file,
caption, category, origin, split, license, width, height, sha256) and settings.json. About 10%
of the images (by a hash of image_id) are split='heldout': the demo web never serves them.
Without the packages (and without root to install them) the pool is the committed fixture.
By default the pool is every usable image of the packages (~9,460). `write_manifests` later
adds near-duplicate copies and placeholders under <out>/pool/derived/ (+ derived.parquet).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.demoweb import sources
from pipeline.demoweb.packages import PARTS, ensure_installed
from pipeline.demoweb.sources import Candidate
from pipeline.progress import progress

FIXTURE_DIR = Path(__file__).parent / "fixture"
# Above the ~9,600 candidates of the Debian packages: the default pool is all of them (~9,460
# render; openclipart posters over 40 Mpixel and emoji the font cannot draw are left out).
DEFAULT_MAX_IMAGES = 20000
DEFAULT_MAX_SIDE = 256
HELDOUT_PERCENT = 10
VAL_PERCENT = 10
IMAGE_PART = next(p for p in PARTS if p.name == "images")
POOL_VERSION = 2  # 2: the 'val' split
COLUMNS = ["image_id", "file", "caption", "category", "origin", "split", "license",
           "width", "height", "sha256"]


@dataclass(frozen=True)
class SourceRoots:
    openclipart: Path = sources.OPENCLIPART_ROOT
    tuxpaint: Path = sources.TUXPAINT_ROOT
    emoji_font: Path = sources.EMOJI_FONT
    emoji_test: Path = sources.EMOJI_TEST


def split_of(image_id: str) -> str:
    """'heldout' for ~10% of ids (the eval sets' test splits), 'val' for another ~10% (the
    linear probe's train split, and where a recipe may be tuned: never on 'heldout'), 'web'
    for the rest (served); by hash, the same on every machine and every pool size."""
    h = int(hashlib.md5(f"split:{image_id}".encode()).hexdigest()[:8], 16) % 100
    return ("heldout" if h < HELDOUT_PERCENT else
            "val" if h < HELDOUT_PERCENT + VAL_PERCENT else "web")


def gather(roots: SourceRoots) -> list[Candidate]:
    return (sources.openclipart_candidates(roots.openclipart)
            + sources.emoji_candidates(roots.emoji_font, roots.emoji_test)
            + sources.tuxpaint_candidates(roots.tuxpaint))


def _id_hash(c: Candidate) -> str:
    return hashlib.md5(f"pick:{c.image_id}".encode()).hexdigest()


def select(cands: list[Candidate], max_images: int) -> list[Candidate]:
    """Deterministic, balanced pick: origins share the cap evenly (a small origin's unused
    share goes to the others); within an origin categories take turns, so 1,800 computer icons
    cannot crowd out 300 animals."""
    by_origin: dict[str, dict[str, list[Candidate]]] = defaultdict(lambda: defaultdict(list))
    for c in cands:
        by_origin[c.origin][c.category].append(c)
    sizes = {o: sum(map(len, cats.values())) for o, cats in by_origin.items()}
    quota: dict[str, int] = {}
    left, origins = max_images, sorted(sizes, key=lambda o: sizes[o])
    for i, o in enumerate(origins):
        quota[o] = min(sizes[o], left // (len(origins) - i))
        left -= quota[o]
    picked: list[Candidate] = []
    for o in sorted(by_origin):
        queues = [sorted(v, key=_id_hash) for _, v in sorted(by_origin[o].items())]
        taken, depth = 0, 0
        while taken < quota[o]:
            for q in queues:
                if depth < len(q) and taken < quota[o]:
                    picked.append(q[depth])
                    taken += 1
            depth += 1
    return sorted(picked, key=lambda c: c.image_id)


def _render_one(c: Candidate, max_side: int, font: Path) -> tuple[Candidate, bytes, str] | None:
    out = sources.render(c, max_side, font)
    return None if out is None else (c, out[0], out[1])


def _write_pool(rendered: list[tuple[Candidate, bytes, str]], dest: Path) -> int:
    from PIL import Image

    (dest / "images").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {k: [] for k in COLUMNS}
    for c, data, ext in sorted(rendered, key=lambda r: r[0].image_id):
        rel = f"images/{c.image_id}.{ext}"
        (dest / rel).write_bytes(data)
        with Image.open(dest / rel) as im:
            w, h = im.size
        for k, v in zip(COLUMNS, [c.image_id, rel, c.caption, c.category, c.origin,
                                  split_of(c.image_id), c.license, w, h,
                                  hashlib.sha256(data).hexdigest()], strict=True):
            rows[k].append(v)
    pq.write_table(pa.table(rows), dest / "pool.parquet")
    return len(rows["image_id"])


def render_all(cands: list[Candidate], max_side: int, font: Path,
               workers: int | None = None) -> list[tuple[Candidate, bytes, str]]:
    workers = workers or min(4, os.cpu_count() or 1)
    fn = partial(_render_one, max_side=max_side, font=font)
    bar = progress(total=len(cands), desc="demo pool", unit="img")
    if workers <= 1 or len(cands) < 200:
        results = []
        for c in cands:
            results.append(fn(c))
            bar.update()
    else:
        # spawn, not fork: callers (tests, the demo) may already run server threads.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
            results = []
            for r in ex.map(fn, cands, chunksize=32):
                results.append(r)
                bar.update()
    bar.close()
    return [r for r in results if r is not None]


def _copy_fixture(dest: Path) -> int:
    table = pq.read_table(FIXTURE_DIR / "pool.parquet")
    shutil.copytree(FIXTURE_DIR / "images", dest / "images")
    ids = table.column("image_id").to_pylist()
    table = table.set_column(table.schema.get_field_index("split"), "split",
                             pa.array([split_of(i) for i in ids]))
    pq.write_table(table, dest / "pool.parquet")
    return table.num_rows


def assemble_pool(out_dir: Path, prefer_system: bool = True, max_images: int = DEFAULT_MAX_IMAGES,
                  max_side: int = DEFAULT_MAX_SIDE, roots: SourceRoots | None = None,
                  workers: int | None = None, force: bool = False) -> Path:
    """Build (or reuse) `out_dir/pool` and return its path.

    With prefer_system the Debian packages are used (installed first when missing and we are
    root); otherwise, or when they give nothing, the committed fixture is copied. Reruns with
    the same settings and the same candidates return at once.
    """
    out_dir = Path(out_dir)
    pool_dir = out_dir / "pool"
    roots = roots or SourceRoots()
    cands: list[Candidate] = []
    if prefer_system:
        if roots == SourceRoots():
            ensure_installed(IMAGE_PART.packages)
        cands = select(gather(roots), max_images)
        if not cands:
            print("witforge demo-data: the Debian image packages are missing and could not be "
                  f"installed; FELL BACK to the small committed fixture ({FIXTURE_DIR})",
                  file=sys.stderr)
    settings = {"version": POOL_VERSION, "source": "system" if cands else "fixture",
                "max_images": max_images, "max_side": max_side,
                "candidates": hashlib.md5("\n".join(
                    f"{c.image_id}\t{c.caption}\t{c.category}" for c in cands).encode()
                ).hexdigest()}
    marker = pool_dir / "settings.json"
    if (not force and marker.is_file() and (pool_dir / "pool.parquet").is_file()
            and {k: v for k, v in json.loads(marker.read_text()).items() if k != "images"}
            == settings):
        return pool_dir
    tmp = out_dir / f".pool.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if cands:
            n = _write_pool(render_all(cands, max_side, roots.emoji_font, workers), tmp)
        else:
            n = _copy_fixture(tmp)
        settings["images"] = n
        (tmp / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
        shutil.rmtree(pool_dir, ignore_errors=True)
        tmp.rename(pool_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return pool_dir


def make_fixture(per_origin: int = 150, side: int = 96, dest: Path = FIXTURE_DIR) -> int:
    """Regenerate the committed fixture: openclipart (public domain) and Noto emoji only;
    Tux Paint stamps are GPL and stay out of the repository."""
    cands = [c for c in gather(SourceRoots()) if c.origin in ("openclipart", "emoji")]
    if not cands:
        raise ValueError("make_fixture needs openclipart-png/-svg and fonts-noto-color-emoji")
    picked = select(cands, 2 * per_origin)
    shutil.rmtree(dest / "images", ignore_errors=True)
    return _write_pool(render_all(picked, side, sources.EMOJI_FONT, workers=1), dest)


def summarize(pool_dir: Path) -> str:
    import duckdb

    rows = duckdb.sql(
        f"SELECT origin, split, count(*) FROM read_parquet('{pool_dir / 'pool.parquet'}') "
        "GROUP BY ALL ORDER BY ALL").fetchall()
    return ", ".join(f"{o}/{s}={n}" for o, s, n in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="witforge demo-data",
        description="Assemble the demo pool of real image-caption pairs from Debian packages "
        "(openclipart, Noto emoji, Tux Paint stamps) into <out>/pool. ~10%% of images are "
        "held out for evaluation and never served by the demo web.")
    p.add_argument("--out", type=Path, default=Path("demo_data"), help="output folder")
    p.add_argument("--fixture-only", action="store_true",
                   help="use the small committed fixture, not the Debian packages")
    p.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES,
                   help="pool size cap, web + heldout (default %(default)s)")
    p.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE,
                   help="downscale images to this longest side (default %(default)s)")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--make-fixture", action="store_true",
                   help="(maintainers) regenerate pipeline/demoweb/fixture from the packages")
    args = p.parse_args(argv)
    if args.max_images < 1 or args.max_side < 16:
        p.error("--max-images must be >= 1 and --max-side >= 16")
    if args.make_fixture:
        n = make_fixture()
        print(f"wrote {n} fixture images to {FIXTURE_DIR}")
        return 0
    pool_dir = assemble_pool(args.out, prefer_system=not args.fixture_only,
                             max_images=args.max_images, max_side=args.max_side,
                             force=args.force)
    print(f"demo pool: {pool_dir} ({summarize(pool_dir)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
