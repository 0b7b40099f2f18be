"""64-bit perceptual hash (DCT pHash), computed per tar in parallel and cached.

Same algorithm as ``imagehash.phash`` (hash_size 8, highfreq_factor 4): grey, Lanczos resize
to 32×32, 2-D DCT-II, keep the 8×8 lowest frequencies, bit = coefficient > their median, bits
in row-major order with the first bit most significant (so ``f"{h:016x}"`` equals imagehash's
hex string). The DCT is a 8×32 matrix product instead of scipy's FFT, which gives the same
coefficients up to float rounding; coefficients are rounded to 1e-3 before the median so
exact ties (flat images) hash the same on every machine.

``decode="draft"`` (``image_dedup.phash_decode``) is a faster, not bit-identical, path for
JPEGs: pHash looks only at a 32×32 grey image, so it decodes the luma channel alone at 1/2,
1/4 or 1/8 scale in libjpeg's DCT domain (the largest reduction that keeps both sides ≥ 32,
PIL's ``Image.draft`` rule), then resizes and hashes as above. Most of the exact path's time
is the full colour decode and the Lanczos pass over the full image; this skips both (3.6-6×
faster, bench/bench_phash.py). The scaled decode runs in OpenCV (img2dataset's own
dependency, already installed), which gives the same pixels as PIL's draft decode with less
overhead; PIL's draft decode is the fallback. Other formats (PNG, WebP) take the exact path.
"""

from __future__ import annotations

import functools
import hashlib
import io
import multiprocessing as mp
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dedup.imagestore import KEY_COL, TAR_COL, iter_tar_images
from pipeline.progress import progress

HASH_SIZE = 8
# Starting worker processes costs ~1-3 s (imports); below this much work one process is faster.
MIN_PARALLEL_BYTES = 16 * 1024 * 1024
IMG_SIZE = HASH_SIZE * 4


def _dct_rows(n: int, k: int) -> np.ndarray:
    # scipy.fftpack.dct type II, norm=None: y[u] = 2 * sum_x f[x] cos(pi * u * (2x + 1) / 2n)
    u = np.arange(k)[:, None]
    x = np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * u * (2 * x + 1) / (2 * n))


_D = _dct_rows(IMG_SIZE, HASH_SIZE)
_DT = np.ascontiguousarray(_D.T)


PHASH_DECODES = ("exact", "draft")
DRAFT_MIN_SIDE = IMG_SIZE  # the draft decode keeps both sides at least this long


def _hash_grey(grey: Image.Image) -> int:
    px = np.asarray(grey.resize((IMG_SIZE, IMG_SIZE), Image.Resampling.LANCZOS),
                    dtype=np.float64)
    low = (_D @ px @ _DT).ravel().round(3)
    # np.median of 64 values, without its ~10 µs of Python overhead: the mean of the middle two
    mid = np.partition(low, (31, 32))
    return int.from_bytes(np.packbits(low > (mid[31] + mid[32]) / 2).tobytes(), "big")


def phash_image(img: Image.Image) -> int:
    """The 64-bit pHash of a PIL image as an unsigned int."""
    return _hash_grey(img.convert("L"))


def draft_scale(width: int, height: int) -> int:
    """PIL's ``Image.draft`` rule: the largest of 8, 4, 2, 1 keeping both sides ≥ 32."""
    fit = min(width // DRAFT_MIN_SIDE, height // DRAFT_MIN_SIDE)
    return next((s for s in (8, 4, 2) if fit >= s), 1)


@functools.cache
def _cv2_flags() -> dict[int, int] | None:
    try:
        import cv2
    except ImportError:
        return None
    keep = cv2.IMREAD_IGNORE_ORIENTATION  # PIL does not apply EXIF orientation either
    return {1: cv2.IMREAD_GRAYSCALE | keep, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2 | keep,
            4: cv2.IMREAD_REDUCED_GRAYSCALE_4 | keep, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8 | keep}


def draft_grey(data: bytes, use_cv2: bool = True) -> Image.Image:
    """The grey image the draft path hashes: a JPEG's luma decoded at reduced scale (any
    other format, or a JPEG in CMYK, decoded in full and converted to grey)."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):
            return img.convert("L")
        flags = _cv2_flags() if use_cv2 else None
        if flags is not None:
            import cv2

            px = cv2.imdecode(np.frombuffer(data, np.uint8), flags[draft_scale(*img.size)])
            if px is not None:
                return Image.fromarray(px)
        # PIL decodes what OpenCV refuses (or raises the error the exact path would)
        img.draft("L", (DRAFT_MIN_SIDE, DRAFT_MIN_SIDE))
        return img.convert("L")


def phash_bytes(data: bytes, decode: str = "exact") -> int:
    """The pHash of encoded image bytes; ``decode`` is one of PHASH_DECODES."""
    if decode == "draft":
        return _hash_grey(draft_grey(data))
    if decode != "exact":
        raise ValueError(f"phash decode must be one of {', '.join(PHASH_DECODES)}, got {decode!r}")
    with Image.open(io.BytesIO(data)) as img:
        return phash_image(img)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def phash_tar(path: str, decode: str = "exact") -> list[tuple[str, int | None, str | None]]:
    """(key, phash or None, error or None) for every image member of one tar."""
    out: list[tuple[str, int | None, str | None]] = []
    for key, data in iter_tar_images(path):
        try:
            out.append((key, phash_bytes(data, decode), None))
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
            # PIL raises OSError/SyntaxError/ValueError for truncated or non-image bytes
            out.append((key, None, f"{type(e).__name__}: {e}"[:300]))
    return out


_SCHEMA = pa.schema([("tar", pa.string()), ("key", pa.string()), ("phash", pa.uint64()),
                     ("error", pa.string())])


def _cache_file(cache_dir: Path, tar: str, decode: str) -> Path:
    st = os.stat(tar)
    ident = f"{os.path.abspath(tar)}|{st.st_size}|{st.st_mtime_ns}|v1"
    ident += "" if decode == "exact" else f"|{decode}"  # exact keeps its existing entries
    return cache_dir / f"{hashlib.sha1(ident.encode()).hexdigest()}.parquet"


def _task(args: tuple[str, str, str]) -> tuple[str, int]:
    tar, out, decode = args
    rows = phash_tar(tar, decode)
    table = pa.table({
        "tar": [tar] * len(rows), "key": [r[0] for r in rows],
        "phash": pa.array([r[1] for r in rows], pa.uint64()), "error": [r[2] for r in rows],
    }, schema=_SCHEMA)
    tmp = f"{out}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, out)  # a crash never leaves a half-written cache entry
    return tar, len(rows)


def pool_size(todo_bytes: int, tars: int, workers: int,
              min_parallel_bytes: int = MIN_PARALLEL_BYTES) -> int:
    """How many processes hash ``tars`` tars of ``todo_bytes`` bytes: 1 (this one) for a
    single tar or less than ``min_parallel_bytes`` of them, else a pool of up to ``workers``."""
    if workers <= 1 or tars <= 1 or todo_bytes < min_parallel_bytes:
        return 1
    return min(workers, tars)


def hash_tars(tars: Sequence[str], cache_dir: Path, workers: int = 2,
              desc: str = "pHash", decode: str = "exact",
              stats: dict | None = None,
              min_parallel_bytes: int = MIN_PARALLEL_BYTES) -> list[Path]:
    """pHash every image member of each tar (in parallel, cached by path+size+mtime+decode).

    Returns the cache Parquet files (columns tar, key, phash UBIGINT, error), one per tar.
    ``stats`` (if given) gets the bytes of the tars hashed now, the processes that did it
    and the images. ``min_parallel_bytes``: below it, this process hashes alone
    (`witforge plan` sets 0 to time the pool on a pilot's few tars).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    tars = sorted(set(tars))
    if decode not in PHASH_DECODES:
        raise ValueError(f"phash decode must be one of {', '.join(PHASH_DECODES)}, got {decode!r}")
    files = [_cache_file(cache_dir, t, decode) for t in tars]
    todo = [(t, str(f), decode) for t, f in zip(tars, files, strict=True) if not f.exists()]
    if todo:
        bar = progress(total=len(todo), desc=desc, unit="tar", leave=False)
        images = 0
        todo_bytes = sum(os.path.getsize(t) for t, _, _ in todo)
        processes = pool_size(todo_bytes, len(todo), workers, min_parallel_bytes)
        if stats is not None:
            stats.update(bytes=todo_bytes, processes=processes)
        if processes == 1:
            results: Iterable[tuple[str, int]] = map(_task, todo)
            for _, n in results:
                images += n
                bar.set_postfix(images=images)
                bar.update(1)
        else:
            # spawn: the parent may hold a DuckDB connection with threads; forking that is unsafe
            with mp.get_context("spawn").Pool(processes) as pool:
                for _, n in pool.imap_unordered(_task, todo):
                    images += n
                    bar.set_postfix(images=images)
                    bar.update(1)
        bar.close()
        if stats is not None:
            stats["images"] = images
    return files


_ATTACH_SQL = (Path(__file__).parent / "sql" / "attach_phash.sql").read_text()


def attach_phash(con: duckdb.DuckDBPyConnection, run_dir: Path, cache_dir: Path,
                 workers: int = 2, tar_col: str = TAR_COL, key_col: str = KEY_COL,
                 decode: str = "exact") -> dict:
    """Create temp table ``hashed`` = table ``src`` + phash UBIGINT + phash_error VARCHAR.

    ``src`` must have the crawl's tar (relative to ``run_dir``) and key columns.
    """
    cols = [r[0] for r in con.execute("DESCRIBE src").fetchall()]
    for c in (tar_col, key_col, "uid"):
        if c not in cols:
            raise ValueError(f"input has no {c!r} column (columns: {', '.join(cols)}); "
                             "pHash needs the crawl's tar and key")
    rel_tars = [r[0] for r in con.execute(
        f"SELECT DISTINCT {tar_col} FROM src WHERE {tar_col} IS NOT NULL").fetchall()]
    mapping = {t: str(run_dir / t) for t in rel_tars}
    missing = [a for a in mapping.values() if not os.path.isfile(a)]
    if missing:
        raise ValueError(f"crawl tar not found: {missing[0]} ({len(missing)} missing)")
    hashed = {"bytes": 0, "processes": 0}  # all cached: nothing hashed now
    files = hash_tars(list(mapping.values()), cache_dir, workers, decode=decode, stats=hashed)
    con.execute("CREATE OR REPLACE TEMP TABLE tarmap (tar VARCHAR, abs VARCHAR)")
    if mapping:
        con.executemany("INSERT INTO tarmap VALUES (?, ?)", list(mapping.items()))
        con.execute("CREATE OR REPLACE TEMP TABLE phash_cache AS "
                    "SELECT * FROM read_parquet($files)", {"files": [str(f) for f in files]})
    else:
        con.execute("CREATE OR REPLACE TEMP TABLE phash_cache AS SELECT NULL::VARCHAR tar, "
                    "NULL::VARCHAR key, NULL::UBIGINT phash, NULL::VARCHAR error WHERE false")
    sql = _ATTACH_SQL
    if (tar_col, key_col) != ("tar", "key"):
        sql = sql.replace("s.tar", f"s.{tar_col}").replace("s.key", f"s.{key_col}")
    con.execute(sql)
    images = con.execute("SELECT count(*) FROM phash_cache").fetchall()[0][0]
    return {"tars": len(files), "images_hashed": images, "phash_bytes": hashed["bytes"],
            "phash_processes": hashed["processes"]}
