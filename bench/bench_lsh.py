"""Benchmark: the near-pair join (dedup/lsh.py) on 10M generated 64-bit hashes with hot buckets.

The input, as image_dedup hands it over (distinct hashes; equal pHashes are collapsed first):
* uniform random hashes (the bulk);
* planted pairs: a hash and a copy with 1-4 bits flipped (5 % of the rows);
* a sparse hot group, as near-blank images and one template make: 10 % of the rows share
  their top 22 bits (one key of a table, a million equal keys at 10M) and are random
  elsewhere, with planted pairs inside it (the pairs the cap can cost);
* a dense cluster, as one logo re-encoded many times: 20k hashes within 3 bits of a centre.
Reported: time, peak RSS of this process, DuckDB spill (the temp folder's peak size),
candidates, buckets capped, recall of each kind of planted pair, and the share of the dense
cluster that ends in one connected component. Peer, at 1M uniform + planted: the same join
with the old layout (5 one-block tables of 13 bits, the previous default).
The 10M run also extrapolates 100M with the join's cost model; ``--rows 100000000`` measures it
(and writes bench/results/lsh_100m.json beside the 10M file; ``--skip-plain`` leaves out the 1M
layout comparison).
``python -m bench.bench_lsh [--quick] [--rows N]`` writes bench/results/lsh.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from bench import write_results
from dedup.lsh import (
    DEFAULT_MAX_BUCKET,
    _estimated_cost,
    auto_blocks,
    components,
    default_bands,
    near_pairs,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "lsh.json"
K = 4


def _flip(h: np.ndarray, rng: np.random.Generator, max_bits: int, lo: int = 0,
          hi: int = 64) -> np.ndarray:
    """Each hash with 1..max_bits random bits in [lo, hi) flipped (a position may repeat,
    so a copy can be closer than drawn; distances are measured, never assumed)."""
    d = rng.integers(1, max_bits + 1, size=len(h))
    out = h.copy()
    for j in range(max_bits):
        pos = rng.integers(lo, hi, size=len(h)).astype(np.uint64)
        out ^= np.where(j < d, np.uint64(1) << pos, np.uint64(0))
    return out


def make_hashes(n: int, seed: int = 0, hot: bool = True) -> dict:
    """n distinct hashes (ids 0..n-1) and the planted structure, all as numpy arrays."""
    rng = np.random.default_rng(seed)
    n_pairs = n // 40  # 5 % of the rows are the two sides of planted pairs
    n_hot = n // 10 if hot else 0
    n_hot_pairs = n_hot // 50
    n_dense = min(20_000, n // 500) if hot else 0
    n_bulk = n - 2 * n_pairs - n_hot - n_hot_pairs - n_dense

    def rand(m: int) -> np.ndarray:
        return rng.integers(0, 2**64 - 1, size=m, dtype=np.uint64, endpoint=True)

    bulk = rand(n_bulk + n_pairs)
    pair_src = np.arange(n_bulk, n_bulk + n_pairs)
    pair_dup = _flip(bulk[pair_src], rng, K)
    top = np.uint64(0xFFFFFC0000000000)  # the top 22 bits
    hot_rows = (rand(n_hot) & ~top) | (np.uint64(0x2A5A5A) << np.uint64(42))
    hot_src = rng.choice(n_hot, size=n_hot_pairs, replace=False) if n_hot else np.array([], int)
    hot_dup = _flip(hot_rows[hot_src], rng, K, 0, 42)
    centre = rand(1)
    dense = _flip(np.repeat(centre, n_dense), rng, 3) if n_dense else np.array([], np.uint64)
    h = np.concatenate([bulk, pair_dup, hot_rows, hot_dup, dense])
    off_pairs = n_bulk + n_pairs
    off_hot = off_pairs + n_pairs
    off_hot_dup = off_hot + n_hot
    off_dense = off_hot_dup + n_hot_pairs
    # keep the first row of every value (the stage collapses equal hashes the same way)
    _, first = np.unique(h, return_index=True)
    keep = np.zeros(len(h), bool)
    keep[first] = True
    return {"h": h, "keep": keep,
            "planted": (pair_src, off_pairs + np.arange(n_pairs)),
            "hot_planted": (off_hot + hot_src, off_hot_dup + np.arange(n_hot_pairs)),
            "dense": np.arange(off_dense, off_dense + n_dense),
            "counts": {"rows": int(len(h)), "distinct": int(keep.sum()), "bulk": n_bulk,
                       "planted_pairs": n_pairs, "hot_group_rows": n_hot,
                       "hot_group_planted_pairs": n_hot_pairs, "dense_cluster_rows": n_dense}}


class _Peak:
    """The largest size a folder reaches while the block runs (DuckDB's spill files)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.peak, self._stop = folder, 0, threading.Event()

    def _size(self) -> int:
        total = 0
        for root, _, files in os.walk(self.folder):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(root, f))
                except OSError:
                    pass
        return total

    def __enter__(self) -> _Peak:
        def watch() -> None:
            while not self._stop.wait(0.5):
                self.peak = max(self.peak, self._size())
        self._t = threading.Thread(target=watch, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._size())


def _recall(con: duckdb.DuckDBPyConnection, name: str, pairs: tuple, keep: np.ndarray,
            h: np.ndarray) -> dict:
    a, b = pairs
    ok = keep[a] & keep[b] & (np.bitwise_count(h[a] ^ h[b]) <= K) & (h[a] != h[b])
    lo, hi = np.minimum(a[ok], b[ok]), np.maximum(a[ok], b[ok])
    con.register(f"{name}_arrow", pa.table({"a": lo, "b": hi}))
    found = con.execute(f"SELECT count(*) FROM {name}_arrow p SEMI JOIN pairs q "
                        "ON p.a = q.a AND p.b = q.b").fetchall()[0][0]
    return {"pairs_within_k": int(ok.sum()), "found": found,
            "recall": round(found / max(1, int(ok.sum())), 5)}


def run_join(data: dict, blocks: int, max_bucket: int, tmp: Path, memory_limit: str,
             count_candidates: bool = False) -> dict:
    h, keep = data["h"], data["keep"]
    spill = tmp / "duckdb_tmp"
    spill.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute("SET threads = 2")
    con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute(f"SET temp_directory = '{spill}'")
    con.execute("SET preserve_insertion_order = false")
    ids = np.nonzero(keep)[0]
    con.register("hh_arrow", pa.table({"id": ids, "h": h[ids]}))
    con.execute("CREATE TABLE hh AS SELECT * FROM hh_arrow")
    con.unregister("hh_arrow")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    st: dict = {}
    with _Peak(spill) as peak:
        t0 = time.perf_counter()
        near_pairs(con, "hh", None, K, blocks, "pairs", max_bucket=max_bucket, stats=st,
                   count_candidates=count_candidates)
        secs = time.perf_counter() - t0
    out = {"rows": int(len(ids)), "seconds": round(secs, 1), **st,
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "rss_before_join_gib": round(rss0 / 2**20, 2),
           "spill_peak_gib": round(peak.peak / 2**30, 2), "memory_limit": memory_limit,
           "threads": 2}
    out["recall_planted"] = _recall(con, "planted", data["planted"], keep, h)
    if len(data["hot_planted"][0]):
        out["recall_hot_group_planted"] = _recall(con, "hot_planted", data["hot_planted"],
                                                  keep, h)
    dense = data["dense"][keep[data["dense"]]]
    if len(dense):
        lo, hi = int(dense.min()), int(dense.max())
        e = con.execute(f"SELECT a, b FROM pairs WHERE a BETWEEN {lo} AND {hi} "
                        f"AND b BETWEEN {lo} AND {hi}").fetchnumpy()
        nodes, roots = components(e["a"], e["b"])
        biggest = np.bincount(np.unique(roots, return_inverse=True)[1]).max() if len(roots) else 0
        out["dense_cluster"] = {"distinct_rows": int(len(dense)),
                                "in_largest_component": round(int(biggest) / len(dense), 5)}
    con.close()
    shutil.rmtree(spill, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_lsh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1M rows with hot groups (~30 s)")
    p.add_argument("--rows", type=int, default=10_000_000, help="rows of the hot-bucket run")
    p.add_argument("--max-bucket", type=int, default=DEFAULT_MAX_BUCKET,
                   help="the cap (image_dedup.lsh_max_bucket)")
    p.add_argument("--memory-limit", default="4GB", help="DuckDB memory_limit")
    p.add_argument("--skip-plain", action="store_true", help="leave out the 1M layout check")
    args = p.parse_args(argv)
    rows = 1_000_000 if args.quick else args.rows
    t_all = time.time()
    result: dict = {"area": "lsh", "quick": args.quick, "machine": platform.machine(),
                    "cpus": os.cpu_count(), "k": K, "max_bucket": args.max_bucket}
    with tempfile.TemporaryDirectory(prefix="bench_lsh_") as d:
        tmp = Path(d)
        if not args.quick and not args.skip_plain:  # the layout change alone, old input
            plain = make_hashes(1_000_000, seed=0, hot=False)
            result["plain_1m"] = {
                "auto": run_join(plain, 0, args.max_bucket, tmp, args.memory_limit),
                "old_layout_5x13bit": run_join(plain, default_bands(K), 0, tmp,
                                               args.memory_limit),
            }
            print("plain 1M", json.dumps({k: v["seconds"] for k, v in result["plain_1m"].items()}),
                  file=sys.stderr)
        data = make_hashes(rows, seed=1)
        result["input"] = data["counts"]
        hot = run_join(data, 0, args.max_bucket, tmp, args.memory_limit)
        result["hot"] = hot
        print("hot", json.dumps(hot), file=sys.stderr)
    n, b = hot["rows"], hot["blocks"]
    b100 = auto_blocks(K, 100_000_000)
    scale = _estimated_cost(b100, K, 100_000_000, 100_000_000, True) / \
        _estimated_cost(b, K, n, n, True)
    result["extrapolated_100m"] = {
        "blocks": b100, "seconds": round(hot["seconds"] * scale),
        "how": f"10M seconds x cost model ratio ({scale:.1f}): rows x tables + candidates/2, "
               "uniform hashes, same machine and 2 threads; hot groups scaled alike; "
               "not measured",
    } if 10_000_000 <= rows < 100_000_000 else None
    result["seconds"] = round(time.time() - t_all, 1)
    result["summary"] = {
        "rows": hot["rows"], "seconds": hot["seconds"], "blocks": hot["blocks"],
        "tables": hot["tables"], "peak_rss_gib": hot["peak_rss_gib"],
        "spill_peak_gib": hot["spill_peak_gib"], "hot_buckets": hot["hot_buckets"],
        "recall_planted": hot["recall_planted"]["recall"],
        "recall_hot_group_planted": hot.get("recall_hot_group_planted", {}).get("recall"),
        "dense_in_one_component": hot.get("dense_cluster", {}).get("in_largest_component"),
        **({"plain_1m_seconds_auto_vs_old": [result["plain_1m"]["auto"]["seconds"],
                                             result["plain_1m"]["old_layout_5x13bit"]["seconds"]]}
           if "plain_1m" in result else {}),
    }
    result["command"] = "python -m bench.bench_lsh" + (" --quick" if args.quick else "") + (
        f" --rows {rows}" if rows != 10_000_000 and not args.quick else "")
    big = rows >= 100_000_000 and not args.quick
    write_results(RESULTS.with_name(f"lsh_{rows // 1_000_000}m.json") if big else RESULTS,
                  result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
