"""Benchmark: pHash images/s per core, the LSH candidate join on 1M hashes, shard writing MB/s.

Peers, side by side:
* pHash — the imagehash algorithm as the imagehash package writes it (scipy.fftpack DCT), on
  the same decoded images, one core each;
* LSH — brute force (every pair's popcount, numpy), timed on a slice and extrapolated;
* shards — GNU ``tar -cf`` of the same members extracted as files (goal: ours ≥ 0.8× its MB/s);
  both sides run three times, alternating, and the medians are compared.

Images are real clip art (Debian openclipart-png) re-encoded the way the crawl stores them
(256 px, JPEG q95); without that package, the committed demo fixture images.
``python -m bench.bench_dedup_shard [--quick]`` writes bench/results/dedup_shard.json.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from PIL import Image

from bench import write_results
from dedup.lsh import default_bands, near_pairs
from dedup.phash import hash_tars, phash_tar

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "dedup_shard.json"
CLIPART = Path("/usr/share/openclipart/png")
FIXTURE = REPO / "pipeline" / "demoweb" / "fixture" / "images"


def clipart_files() -> tuple[list[Path], str]:
    """The real images the image benches use, in a fixed shuffled order, and their origin."""
    files = sorted(CLIPART.rglob("*.png")) if CLIPART.is_dir() else []
    origin = "openclipart-png"
    if not files:
        files, origin = sorted(FIXTURE.glob("*.jpg")), "demo fixture"
    random.Random(0).shuffle(files)
    return files, origin


def on_white(path: Path) -> Image.Image | None:
    """The image flattened on white (clip art is mostly transparent), or None if unusable."""
    try:
        im = Image.open(path)
        if im.width * im.height > 16_000_000:
            return None  # a few posters are huge; the crawl would have thumbnailed them
        im = im.convert("RGBA")
    except (OSError, Image.DecompressionBombError):
        return None
    with im:
        bg = Image.new("RGB", im.size, "white")
        bg.paste(im, mask=im.getchannel("A"))
    return bg


def crawl_jpeg(img: Image.Image, side: int = 256, quality: int = 95) -> bytes:
    """The image as the crawl stores it: longer side ``side`` px, JPEG at ``quality``."""
    bg = img.copy()
    bg.thumbnail((side, side)) if max(bg.size) > side else None
    if max(bg.size) < side:
        s = side / max(bg.size)
        bg = bg.resize((max(1, round(bg.width * s)), max(1, round(bg.height * s))))
    buf = io.BytesIO()
    bg.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _crawl_like_jpegs(n: int, side: int = 256) -> tuple[list[bytes], str]:
    """n JPEGs as the crawl stores them (longer side ``side`` px, q95) from real images."""
    files, origin = clipart_files()
    out: list[bytes] = []
    for f in files:
        if len(out) >= n:
            break
        img = on_white(f)
        if img is not None:
            out.append(crawl_jpeg(img, side))
    return out, origin


def _write_tar(path: Path, images: list[bytes], start: int = 0) -> None:
    with tarfile.open(path, "w") as tf:
        for i, data in enumerate(images):
            key = f"{start + i:09d}"
            for ext, blob in (("jpg", data), ("txt", f"caption {i}".encode())):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(blob)
                tf.addfile(ti, io.BytesIO(blob))


def _imagehash_reference(data: bytes) -> int:
    import scipy.fftpack

    with Image.open(io.BytesIO(data)) as img:
        px = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS))
    dct = scipy.fftpack.dct(scipy.fftpack.dct(px, axis=0), axis=1)[:8, :8]
    return int("".join("1" if b else "0" for b in (dct > np.median(dct)).ravel()), 2)


def bench_phash(images: list[bytes], tmp: Path) -> dict:
    tars = []
    per = max(1, len(images) // 4)
    for i in range(4):
        t = tmp / f"ph{i}.tar"
        _write_tar(t, images[i * per:(i + 1) * per], i * per)
        tars.append(str(t))
    n = per * 4
    t0 = time.perf_counter()
    for t in tars:
        phash_tar(t)
    ours = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for data in images[:n]:
        _imagehash_reference(data)
    peer = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    hash_tars(tars, tmp / "cache", workers=2)
    parallel_s = time.perf_counter() - t0
    return {"images": n, "mean_jpeg_bytes": int(sum(map(len, images[:n])) / n),
            "images_per_s_per_core": round(ours, 1),
            "imagehash_algorithm_images_per_s_per_core": round(peer, 1),
            "ratio": round(ours / peer, 2),
            "two_workers_images_per_s": round(n / parallel_s, 1),
            "two_workers_note": "includes starting 2 spawned processes and writing the cache"}


def bench_lsh(n: int, k: int = 4) -> dict:
    rng = np.random.default_rng(0)
    planted = n // 20
    base = rng.integers(0, 2**63, size=n - planted, dtype=np.uint64) * np.uint64(2) \
        + rng.integers(0, 2, size=n - planted, dtype=np.uint64)
    src = rng.integers(0, len(base), size=planted)
    dist = rng.integers(0, k + 1, size=planted)
    dup = base[src].copy()
    for i in range(planted):
        for b in rng.choice(64, size=dist[i], replace=False):
            dup[i] ^= np.uint64(1) << np.uint64(b)
    h = np.concatenate([base, dup])
    con = duckdb.connect()
    con.execute("SET threads = 2")
    con.register("hh_arrow", pa.table({"id": np.arange(n), "h": h}))
    con.execute("CREATE TABLE hh AS SELECT * FROM hh_arrow")
    bands = default_bands(k)
    t0 = time.perf_counter()
    pairs = near_pairs(con, "hh", None, k, bands, "pairs")
    secs = time.perf_counter() - t0
    got = con.execute("SELECT a, b FROM pairs").fetchnumpy()
    found = set(zip(got["a"].tolist(), got["b"].tolist(), strict=True))
    off = len(base)
    hit = sum(1 for i in range(planted) if (int(src[i]), off + i) in found)
    # brute force peer: popcount of xor against all hashes, for a slice of rows
    rows = 200
    t0 = time.perf_counter()
    for i in range(rows):
        x = np.bitwise_xor(h, h[i]).view(np.uint8)
        np.unpackbits(x).reshape(-1, 64).sum(axis=1)
    brute_est = (time.perf_counter() - t0) / rows * n / 2
    return {"hashes": n, "max_distance": k, "bands": bands, "planted_pairs": planted,
            "recall_planted": round(hit / planted, 5), "pairs_found": pairs,
            "seconds": round(secs, 2), "threads": 2,
            "brute_force_seconds_extrapolated": round(brute_est, 1),
            "speedup_vs_brute_force": round(brute_est / secs, 1)}


def bench_shard(images: list[bytes], samples: int, tmp: Path, rounds: int = 3) -> dict:
    from pipeline.config import load_build
    from pipeline.stage import run_stage
    from tests.curation_fixtures import mark_done

    (tmp / "m.csv").write_text("url,caption\nhttp://127.0.0.1/a.jpg,a\n")
    (tmp / "b.yaml").write_text(f"name: bench\nruns_dir: {tmp / 'runs'}\nsources:\n"
                                "  - path: m.csv\nshard:\n  samples_per_shard: 1000\n")
    cfg = load_build(tmp / "b.yaml")
    rows, per_tar = [], 1000
    for start in range(0, samples, per_tar):
        rel = f"06_crawl.work/attempt_000/images/{start // per_tar:05d}.tar"
        chunk = [images[(start + i) % len(images)] for i in range(min(per_tar, samples - start))]
        (cfg.run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        _write_tar(cfg.run_dir / rel, chunk, start)
        rows += [{"uid": f"{start + i:032x}", "url": f"http://127.0.0.1/{start + i}.jpg",
                  "caption": f"a caption for image {start + i}", "source": "bench",
                  "width": 256, "height": 256, "sha256": "0" * 64, "tar": rel,
                  "key": f"{start + i:09d}"} for i in range(len(chunk))]
    mark_done(cfg, "image_dedup", rows)
    t0 = time.perf_counter()
    report = run_stage(cfg, "shard", log=lambda s: None)
    stage_s = time.perf_counter() - t0
    out = cfg.run_dir / "14_shard"
    # peer: the same members as plain files, archived by GNU tar
    files = tmp / "files"
    files.mkdir()
    for t in sorted(out.glob("*.tar")):
        with tarfile.open(t) as tf:
            tf.extractall(files, filter="data")
    names = sorted(os.listdir(files))
    (tmp / "names.txt").write_text("\n".join(names) + "\n")
    subprocess.run(["cat"] + [str(files / n) for n in names[:2000]], check=True,
                   stdout=subprocess.DEVNULL)  # touch: both sides read from the page cache
    # This VM's page-cache writes cost up to 10x more CPU into memory freed long ago (handed
    # back to the host) than into memory just freed, and the machine is shared. So both sides
    # run `rounds` times, alternating, each deleting its own previous output right before it
    # runs (tar's peer.tar, our stage folder), and the medians are compared.
    ours_s, tar_s = [report["shard_seconds"]], []
    for r in range(rounds):
        if r:
            shutil.rmtree(out)
            ours_s.append(run_stage(cfg, "shard", force=True, log=lambda s: None)[
                "shard_seconds"])
        (tmp / "peer.tar").unlink(missing_ok=True)
        t0 = time.perf_counter()
        subprocess.run(["tar", "-cf", str(tmp / "peer.tar"), "-C", str(files), "-T",
                        str(tmp / "names.txt")], check=True)
        tar_s.append(time.perf_counter() - t0)
    tar_mb = (tmp / "peer.tar").stat().st_size / 1e6
    ours_mb = report["bytes_written"] / 1e6
    ours_med, tar_med = statistics.median(ours_s), statistics.median(tar_s)
    return {"samples": samples, "shards": report["shards"], "mb_written": round(ours_mb, 1),
            "tar_cf_mb_written": round(tar_mb, 1), "rounds": rounds,
            "write_seconds": round(ours_med, 3), "write_seconds_runs": ours_s,
            "first_stage_seconds": round(stage_s, 2),
            "mb_per_s": round(ours_mb / ours_med, 1),
            "tar_cf_mb_per_s": round(tar_mb / tar_med, 1), "tar_cf_seconds": round(tar_med, 3),
            "tar_cf_seconds_runs": [round(x, 3) for x in tar_s],
            "ratio": round((ours_mb / ours_med) / (tar_mb / tar_med), 2),
            "goal_ratio": 0.8,
            "note": "ours reads members from the crawl tars (index, plan, shuffle, json, sha256);"
                    " tar -cf archives the same members as files; both from the page cache;"
                    " medians of alternating rounds, each side deleting its previous output"
                    " first (ours timed from indexing the crawl tars to the last shard"
                    " written)"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_dedup_shard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small inputs (a smoke run, ~20 s)")
    p.add_argument("--only", choices=("phash", "lsh", "shard"), action="append",
                   help="run only this part (repeatable); prints its figures and leaves the "
                        "results JSON alone unless every part ran")
    args = p.parse_args(argv)
    parts = set(args.only or ("phash", "lsh", "shard"))
    n_img = 200 if args.quick else 800
    n_hash = 100_000 if args.quick else 1_000_000
    n_samples = 2_000 if args.quick else 20_000
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    with tempfile.TemporaryDirectory(prefix="bench_dedup_shard_") as d:
        tmp = Path(d)
        images, origin = _crawl_like_jpegs(n_img)
        print(f"{len(images)} images from {origin}", file=sys.stderr)
        if "phash" in parts:
            ph = bench_phash(images, tmp)
            print("phash", ph, file=sys.stderr)
        if "lsh" in parts:
            lsh = bench_lsh(n_hash)
            print("lsh", lsh, file=sys.stderr)
        if "shard" in parts:
            (tmp / "shard").mkdir()
            sh = bench_shard(images, n_samples, tmp / "shard")
            print("shard", sh, file=sys.stderr)
    if len(parts) < 3:
        return 0
    result = {
        "area": "dedup_shard", "quick": args.quick, "machine": platform.machine(),
        "cpus": os.cpu_count(), "images_from": origin,
        "phash": ph, "lsh": lsh, "shard": sh,
        "summary": {
            "phash_images_per_s_per_core": ph["images_per_s_per_core"],
            "phash_peer_imagehash_algorithm": ph["imagehash_algorithm_images_per_s_per_core"],
            "lsh_1m_seconds" if not args.quick else "lsh_seconds": lsh["seconds"],
            "lsh_recall": lsh["recall_planted"],
            "shard_mb_per_s": sh["mb_per_s"], "tar_cf_mb_per_s": sh["tar_cf_mb_per_s"],
            "shard_ratio_vs_tar": sh["ratio"],
        },
        "command": "python -m bench.bench_dedup_shard" + (" --quick" if args.quick else ""),
    }
    write_results(RESULTS, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
