"""Benchmark: one exact kNN query as `witforge search` answers it, by index size.

Data: ``n`` random L2-normalised 512-d float32 rows (ViT-B/32's width; the exact scan's cost
depends only on n x d, not on what the vectors hold), k = 40 (ClipClient's num_images).
Sides, on the same rows and queries:
* ours — ``faiss.IndexFlatIP.search`` (what SearchIndex holds per modality), and the same with
  a filter bitmap selecting half the rows (the page's kept/dropped/reason/source filters);
* numpy — ``x @ q`` and ``argpartition``: the obvious brute force;
* DuckDB — ``array_cosine_similarity`` over a FLOAT[512] column, ORDER BY ... LIMIT k (the
  issue's other suggestion), up to 300k rows (loading more takes longer than the bench).
Each figure is the median of ``--queries`` single-query calls after one warm-up call, on the
faiss with 1 thread and with all (on a loaded machine one thread can be faster: OpenMP
waits for descheduled threads); numpy on BLAS's threads. ``python -m bench.bench_search [--quick]``
writes bench/results/search.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "search.json"
DIM, K = 512, 40
DUCKDB_MAX = 300_000


def _rows(n: int, seed: int = 0) -> faiss.IndexFlatIP:
    """An IndexFlatIP of n random unit rows, filled in chunks (no second full copy)."""
    rng = np.random.default_rng(seed)
    index = faiss.IndexFlatIP(DIM)
    for start in range(0, n, 100_000):
        x = rng.standard_normal((min(100_000, n - start), DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        index.add(x)
    return index


def _median_seconds(fn, queries: np.ndarray) -> float:
    fn(queries[0])
    times = []
    for q in queries[1:]:
        t = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(n: int, n_queries: int) -> dict:
    index = _rows(n)
    x = faiss.rev_swig_ptr(index.get_xb(), n * DIM).reshape(n, DIM)  # a view, not a copy
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((n_queries + 1, DIM), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[: n // 2]] = True
    bits = np.packbits(mask, bitorder="little")
    params = faiss.SearchParameters(sel=faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits)))

    def flat(q):
        return index.search(q.reshape(1, -1), K)

    def flat_filtered(q):
        return index.search(q.reshape(1, -1), K, params=params)

    def brute(q):
        s = x @ q
        top = np.argpartition(-s, K)[:K]
        return top[np.argsort(-s[top])]

    # the sides agree on the neighbours
    ids = flat(queries[0])[1][0]
    assert np.array_equal(ids, brute(queries[0])), "faiss and numpy disagree"
    assert mask[flat_filtered(queries[0])[1][0]].all()
    threads = faiss.omp_get_max_threads()
    out = {"n": n, "memory_mb_per_modality": round(n * DIM * 4 / 2**20)}
    try:
        for label, t in (("1_thread", 1), (f"{threads}_threads", threads)):
            faiss.omp_set_num_threads(t)
            out[f"faiss_flat_ip_{label}_s"] = _median_seconds(flat, queries)
            out[f"faiss_flat_ip_half_filtered_{label}_s"] = _median_seconds(flat_filtered, queries)
    finally:
        faiss.omp_set_num_threads(threads)
    out["faiss_flat_ip_s"] = min(v for k, v in out.items() if k.startswith("faiss_flat_ip_")
                                 and "filtered" not in k)
    out["numpy_s"] = _median_seconds(brute, queries)
    if n <= DUCKDB_MAX:
        out["duckdb_array_cosine_s"] = _duckdb(x, queries[: min(6, n_queries + 1)])
    return out


def _duckdb(x: np.ndarray, queries: np.ndarray) -> float:
    import duckdb
    import pyarrow as pa

    con = duckdb.connect()
    flat = pa.array(x.reshape(-1))
    con.register("src", pa.table({"row": pa.array(np.arange(len(x))),
                                  "v": pa.FixedSizeListArray.from_arrays(flat, DIM)}))
    con.execute(f"CREATE TABLE t AS SELECT row, v::FLOAT[{DIM}] AS v FROM src")

    def run(q):
        return con.execute("SELECT row FROM t ORDER BY array_cosine_similarity("
                           f"v, ?::FLOAT[{DIM}]) DESC LIMIT {K}", [q.tolist()]).fetchall()

    got = [r[0] for r in run(queries[0])]
    s = x @ queries[0]
    assert set(got) == set(np.argsort(-s)[:K].tolist()), "duckdb disagrees"
    seconds = _median_seconds(run, queries)
    con.close()
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10k and 100k rows only")
    p.add_argument("--sizes", default="", help="comma-separated row counts")
    p.add_argument("--queries", type=int, default=20)
    args = p.parse_args(argv)
    sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes else
             [10_000, 100_000] if args.quick else [10_000, 100_000, 300_000, 1_000_000])
    rows = []
    for n in sizes:
        r = measure(n, args.queries)
        rows.append(r)
        faiss_ms = "  ".join(f"{k.removeprefix('faiss_flat_ip_').removesuffix('_s')} "
                             f"{v * 1e3:.1f} ms" for k, v in r.items()
                             if k.startswith("faiss_flat_ip_") and k != "faiss_flat_ip_s")
        print(f"n={n:>9,}  faiss: {faiss_ms}  numpy {r['numpy_s'] * 1e3:.1f} ms"
              + (f"  duckdb {r['duckdb_array_cosine_s'] * 1e3:7.1f} ms"
                 if "duckdb_array_cosine_s" in r else ""), flush=True)
    # the exact scan is linear in n: the size answering in one second, from the largest run
    last = rows[-1]
    one_second = int(last["n"] / last["faiss_flat_ip_s"])
    summary = {"dim": DIM, "k": K, "cores": os.cpu_count(),
               "faiss_threads": faiss.omp_get_max_threads(),
               "largest_n": last["n"],
               "largest_n_faiss_ms": round(last["faiss_flat_ip_s"] * 1e3, 1),
               "load_average": os.getloadavg()[0],
               "rows_in_one_second_extrapolated": one_second}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"summary": summary, "rows": rows, "machine": {
        "platform": platform.platform(), "python": sys.version.split()[0],
        "faiss": faiss.__version__}}, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
