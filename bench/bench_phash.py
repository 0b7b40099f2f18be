"""Benchmark: where pHash spends its time, the draft decode, and how far draft agrees with exact.

* The exact path (image_dedup.phash_decode: exact, the imagehash algorithm) split into its
  steps — full colour decode, grey, Lanczos to 32×32, DCT + median — per image on one core.
* The draft path (phash_decode: draft): header, luma-only JPEG decode at 1/2–1/8 scale
  (OpenCV; and PIL's draft decode, its fallback, on its own), Lanczos to 32×32, DCT.
* Peer: the imagehash algorithm as the imagehash package writes it (PIL grey + Lanczos,
  scipy.fftpack DCT) on the same images, one core. Goal: draft ≥ 3× the peer.
* Agreement: bit differences draft vs exact; planted near-duplicate pairs (recompressed q50,
  a smaller copy, 3 % cropped, grey) found and missed at k = image_dedup.phash_max_distance;
  pairs of different clip-art files within k (the whole openclipart-png set unless --quick);
  and, given a finished demo build (``--demo-run``, default runs/demo), the image_dedup stage
  run on its crawl with each decode: rows dropped by both, by one only, and what its truth
  table says they were.

Images are real clip art (Debian openclipart-png) stored the way the crawl stores them
(JPEG q95, longer side 256 and 512 px). Steps run in alternating rounds, medians reported.
``python -m bench.bench_phash [--quick]`` writes bench/results/phash.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from bench import write_results
from bench.bench_dedup_shard import clipart_files, crawl_jpeg, on_white
from dedup import phash
from dedup.lsh import components
from pipeline.config import ImageDedupConfig

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "phash.json"
LANCZOS = Image.Resampling.LANCZOS
K = ImageDedupConfig().phash_max_distance


def imagehash_phash(data: bytes) -> int:
    """imagehash.phash(hash_size=8) written out: PIL grey + Lanczos 32×32, scipy's DCT."""
    import scipy.fftpack

    with Image.open(io.BytesIO(data)) as img:
        px = np.asarray(img.convert("L").resize((32, 32), LANCZOS))
    dct = scipy.fftpack.dct(scipy.fftpack.dct(px, axis=0), axis=1)[:8, :8]
    return int("".join("1" if b else "0" for b in (dct > np.median(dct)).ravel()), 2)


def _timed(steps: dict[str, tuple[Callable, Sequence]], rounds: int) -> dict[str, float]:
    """Median µs per item of each step, the steps alternating round by round."""
    runs: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, (fn, items) in steps.items():
            t0 = time.perf_counter()
            for x in items:
                fn(x)
            runs[name].append((time.perf_counter() - t0) / len(items) * 1e6)
    return {k: statistics.median(v) for k, v in runs.items()}


def _open_load(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _scaled_decode(data: bytes) -> np.ndarray:
    import cv2

    with Image.open(io.BytesIO(data)) as img:
        size = img.size
    return cv2.imdecode(np.frombuffer(data, np.uint8), phash._cv2_flags()[phash.draft_scale(*size)])


def _dct(grey32: Image.Image) -> int:
    return phash._hash_grey(grey32)  # resize to 32×32 is a copy when the image is 32×32


def bench_speed(images: list[bytes], rounds: int) -> dict:
    """µs per image of every step of both paths and of the peer, images/s per core."""
    rgb = [_open_load(d) for d in images]
    grey = [im.convert("L") for im in rgb]
    grey32 = [g.resize((32, 32), LANCZOS) for g in grey]
    small = [Image.fromarray(_scaled_decode(d)) for d in images]
    us = _timed({
        "exact_decode_rgb": (_open_load, images),
        "exact_grey": (lambda im: im.convert("L"), rgb),
        "exact_resize_lanczos": (lambda g: g.resize((32, 32), LANCZOS), grey),
        "dct_median_bits": (_dct, grey32),
        "exact_total": (phash.phash_bytes, images),
        "draft_header": (lambda d: Image.open(io.BytesIO(d)), images),
        "draft_scaled_luma_decode_cv2": (_scaled_decode, images),
        "draft_resize_lanczos": (lambda g: g.resize((32, 32), LANCZOS), small),
        "draft_total": (lambda d: phash.phash_bytes(d, "draft"), images),
        "draft_pil_only_total": (lambda d: phash._hash_grey(phash.draft_grey(d, False)), images),
        "imagehash_algorithm_total": (imagehash_phash, images),
    }, rounds)
    peer = us["imagehash_algorithm_total"]
    return {
        "images": len(images), "mean_jpeg_bytes": int(sum(map(len, images)) / len(images)),
        "decoded_sizes_draft": dict(Counter(f"{im.width}x{im.height}" for im in small)
                                    .most_common(4)),
        "us_per_image": {k: round(v, 1) for k, v in us.items()},
        "images_per_s_per_core": {k.removesuffix("_total"): round(1e6 / v)
                                  for k, v in us.items() if k.endswith("_total")},
        "ratio_vs_imagehash": {k.removesuffix("_total"): round(peer / v, 2)
                               for k, v in us.items() if k.endswith("_total")},
        "exact_split_share": {
            k: round(us[k] / us["exact_total"], 2)
            for k in ("exact_decode_rgb", "exact_grey", "exact_resize_lanczos", "dct_median_bits")},
    }


def _bits(exact: list[int], draft: list[int]) -> dict:
    d = np.array([(a ^ b).bit_count() for a, b in zip(exact, draft, strict=True)])
    return {"images": len(d), "identical": round(float(np.mean(d == 0)), 4),
            "mean_bits": round(float(d.mean()), 2), "p50": int(np.percentile(d, 50)),
            "p90": int(np.percentile(d, 90)), "p99": int(np.percentile(d, 99)),
            "within_k": round(float(np.mean(d <= K)), 4),
            "histogram": {int(b): int(c) for b, c in sorted(Counter(d.tolist()).items())}}


def _pairs_within(h: np.ndarray) -> set[tuple[int, int]]:
    """Every pair (i < j) of hashes within K bits (brute force popcount)."""
    out: set[tuple[int, int]] = set()
    for i in range(len(h) - 1):
        near = np.nonzero(np.bitwise_count(h[i + 1:] ^ h[i]) <= K)[0]
        out.update((i, i + 1 + int(j)) for j in near)
    return out


def _clusters(pairs: set[tuple[int, int]]) -> tuple[set[int], int]:
    """(images in a near-duplicate cluster, images the stage would drop: all but one each)."""
    if not pairs:
        return set(), 0
    a, b = (np.array(x) for x in zip(*pairs, strict=True))
    nodes, roots = components(a, b)
    return set(nodes.tolist()), len(nodes) - len(set(roots.tolist()))


def _found_missed(exact: set, draft: set) -> dict:
    return {"exact": len(exact), "draft": len(draft), "both": len(exact & draft),
            "exact_only_missed_by_draft": len(exact - draft),
            "draft_only_not_found_by_exact": len(draft - exact)}


VARIANTS: dict[str, Callable[[Image.Image], bytes]] = {
    "recompressed_q50": lambda im: crawl_jpeg(im, 256, 50),
    "smaller_copy_160px_q85": lambda im: crawl_jpeg(im, 160, 85),
    "cropped_3pct": lambda im: crawl_jpeg(im.crop((
        round(im.width * .03), round(im.height * .03), round(im.width * .97),
        round(im.height * .97))), 256, 95),
    "grey": lambda im: crawl_jpeg(im.convert("L").convert("RGB"), 256, 95),
}


def bench_agreement(files: list[Path], n_planted: int) -> dict:
    """Draft vs exact on every file (256 px) and on planted pairs from the first n_planted."""
    exact, draft, planted = [], [], {v: {"exact": [], "draft": []} for v in VARIANTS}
    for f in files:
        img = on_white(f)
        if img is None:
            continue
        base = crawl_jpeg(img, 256)
        exact.append(phash.phash_bytes(base))
        draft.append(phash.phash_bytes(base, "draft"))
        if len(exact) <= n_planted:
            for name, make in VARIANTS.items():
                v = make(img)
                planted[name]["exact"].append((exact[-1] ^ phash.phash_bytes(v)).bit_count())
                planted[name]["draft"].append(
                    (draft[-1] ^ phash.phash_bytes(v, "draft")).bit_count())
    per_variant = {}
    for name, d in planted.items():
        e, r = np.array(d["exact"]), np.array(d["draft"])
        per_variant[name] = {
            "pairs": len(e), "found_exact": int((e <= K).sum()), "found_draft": int((r <= K).sum()),
            "found_both": int(((e <= K) & (r <= K)).sum()),
            "exact_only_missed_by_draft": int(((e <= K) & (r > K)).sum()),
            "draft_only": int(((e > K) & (r <= K)).sum()),
            "mean_distance_exact": round(float(e.mean()), 2),
            "mean_distance_draft": round(float(r.mean()), 2)}
    tot = {k: sum(v[k] for v in per_variant.values())
           for k in ("pairs", "found_exact", "found_draft", "found_both",
                     "exact_only_missed_by_draft", "draft_only")}
    pe = _pairs_within(np.array(exact, np.uint64))
    pd = _pairs_within(np.array(draft, np.uint64))
    (ce, de), (cd, dd) = _clusters(pe), _clusters(pd)
    return {
        "k": K, "bit_differences_256px": _bits(exact, draft),
        "planted_pairs": {"per_variant": per_variant, "total": tot,
                          "recall_draft_of_exact": round(tot["found_both"] / tot["found_exact"],
                                                         4)},
        "clipart_pairs_within_k": {"images": len(exact), **_found_missed(pe, pd)},
        "clipart_clustered_images": {**_found_missed(ce, cd), "would_drop_exact": de,
                                     "would_drop_draft": dd},
    }


def bench_demo(demo_run: Path, tmp: Path) -> dict | None:
    """Run image_dedup on a finished demo build's crawl with exact and with draft decoding."""
    import duckdb

    from pipeline.config import load_build
    from pipeline.stage import run_stage

    src = demo_run / "07_image_filter" / "kept.parquet"
    if not (src.is_file() and (demo_run / "06_crawl.work").is_dir()):
        return None
    (tmp / "m.csv").write_text("url,caption\nhttp://127.0.0.1/a.jpg,a\n")
    (tmp / "b.yaml").write_text(f"name: demo\nruns_dir: {tmp / 'runs'}\nsources:\n"
                                "  - path: m.csv\nimage_dedup:\n  workers: 1\n")
    cfg = load_build(tmp / "b.yaml")
    up = cfg.run_dir / "07_image_filter"
    up.mkdir(parents=True)
    (up / "kept.parquet").symlink_to(src)
    (up / "report.json").write_text(json.dumps({"fingerprint": "demo", "kept": 0}))
    (up / "_SUCCESS").write_text("")
    (cfg.run_dir / "06_crawl.work").symlink_to(demo_run / "06_crawl.work")
    dropped, reports = {}, {}
    for decode in ("exact", "draft"):
        cfg.image_dedup.phash_decode = decode
        reports[decode] = run_stage(cfg, "image_dedup", force=True, log=lambda s: None)
        dropped[decode] = {r[0]: r[1] for r in duckdb.sql(
            f"SELECT uid, reason FROM '{cfg.run_dir / '08_image_dedup' / 'dropped.parquet'}'"
        ).fetchall()}
    near = {d: {u for u, r in v.items() if r == "near_duplicate_image"} for d, v in dropped.items()}
    out: dict = {"demo_run": str(demo_run), "rows": reports["exact"]["rows_in"],
                 "near_duplicate_image_drops": _found_missed(near["exact"], near["draft"])}
    truth = demo_run / "truth.parquet"
    if truth.is_file():
        kinds = dict(duckdb.sql(f"SELECT uid, kind FROM '{truth}'").fetchall())
        by_kind: dict = {}
        for decode, rows in dropped.items():
            for uid in rows:
                k = kinds.get(uid, "?")
                if k in ("clean", "near_duplicate"):
                    by_kind.setdefault(k, {}).setdefault(decode, 0)
                    by_kind[k][decode] += 1
        out["dropped_by_truth_kind"] = by_kind
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_phash", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small inputs (a smoke run, ~20 s)")
    p.add_argument("--demo-run", type=Path, default=REPO / "runs" / "demo",
                   help="a finished demo build folder whose crawl image_dedup reruns both ways")
    args = p.parse_args(argv)
    n_img, rounds = (150, 3) if args.quick else (800, 5)
    files, origin = clipart_files()
    t0 = time.time()
    speed = {}
    for side in (256, 512):
        images = []
        for f in files:
            if len(images) >= n_img:
                break
            img = on_white(f)
            if img is not None:
                images.append(crawl_jpeg(img, side))
        speed[f"{side}px"] = bench_speed(images, rounds)
        print(side, json.dumps(speed[f"{side}px"]["images_per_s_per_core"]), file=sys.stderr)
    agree = bench_agreement(files[:n_img] if args.quick else files, 200 if args.quick else 800)
    print(json.dumps(agree["planted_pairs"]["total"]), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench_phash_") as d:
        demo = None if args.quick else bench_demo(args.demo_run, Path(d))
    if demo:
        agree["demo"] = demo
        print(json.dumps(demo), file=sys.stderr)
    result = {
        "area": "phash", "quick": args.quick, "machine": platform.machine(),
        "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 1),
        "images_from": origin, "speed": speed, "agreement": agree,
        "seconds": round(time.time() - t0, 1),
        "summary": {
            **{f"{s}_{k}_per_s": speed[s]["images_per_s_per_core"][k]
               for s in speed for k in ("exact", "draft", "imagehash_algorithm")},
            **{f"{s}_draft_ratio_vs_imagehash": speed[s]["ratio_vs_imagehash"]["draft"]
               for s in speed},
            "draft_identical_share": agree["bit_differences_256px"]["identical"],
            "planted_recall_draft_of_exact": agree["planted_pairs"]["recall_draft_of_exact"],
            "clipart_pairs_within_k": {k: agree["clipart_pairs_within_k"][k]
                                       for k in ("exact", "draft", "both")},
            **({"demo_near_duplicate_drops": agree["demo"]["near_duplicate_image_drops"]}
               if "demo" in agree else {}),
        },
        "command": "python -m bench.bench_phash" + (" --quick" if args.quick else "")
                   + (f" --demo-run {args.demo_run}" if demo and args.demo_run
                      != REPO / "runs" / "demo" else ""),
    }
    write_results(RESULTS, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
