"""Benchmark: MetaCLIP matching and the balance stage on captions drawn from real word counts.

Captions: words drawn from wordfreq's English frequencies (4-16 words, commas, full stops,
capitals). Entries: WordNet lemmas + frequent wordfreq unigrams (as `witforge metadata`
builds them; >= 100k). Peer: MetaCLIP's own loop (spacing + pyahocorasick per caption, one
process). Each method runs in a fresh process so its peak RSS is its own; the match sets are
compared pair by pair. Then the whole balance stage runs on the pool (rows/s).

    python -m bench.bench_balance            # 10M captions
    python -m bench.bench_balance --quick    # 1M captions
Writes bench/results/balance.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "balance.json"


def make_entries(path: Path) -> int:
    from pipeline import metadata

    if path.exists():
        import pyarrow.parquet as pq

        return pq.read_metadata(path).num_rows
    argv = ["--out", str(path), "--unigram-min-freq", "1e-6"]
    if not Path(metadata.DEFAULT_WORDNET, "data.noun").is_file():
        argv = ["--out", str(path), "--no-wordnet", "--unigram-top", "120000"]
    metadata.main(argv)
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def make_pool(path: Path, rows: int, seed: int = 0) -> None:
    """Captions of words drawn by wordfreq frequency, written in 1M-row chunks."""
    if path.exists():
        return
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import wordfreq
    from tqdm import tqdm

    words = wordfreq.top_n_list("en", 50000)
    freq = np.array([wordfreq.word_frequency(w, "en") for w in words])
    caps = [w.capitalize() for w in words]
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    writer = None
    chunk = 1_000_000
    for start in tqdm(range(0, rows, chunk), desc="pool", unit="M rows"):
        n = min(chunk, rows - start)
        lens = rng.integers(4, 17, n)
        idx = rng.choice(len(words), size=int(lens.sum()), p=freq / freq.sum())
        comma = rng.random(idx.size) < 0.08
        upper = rng.random(n) < 0.4
        stop = rng.random(n) < 0.5
        out, pos = [], 0
        for i in range(n):
            k = int(lens[i])
            toks = [words[j] + ("," if c else "") for j, c in
                    zip(idx[pos:pos + k].tolist(), comma[pos:pos + k].tolist(), strict=True)]
            if upper[i]:
                toks[0] = caps[idx[pos]]
            pos += k
            out.append(" ".join(toks) + ("." if stop[i] else ""))
        uids = [f"{start + i:032x}" for i in range(n)]
        t = pa.table({"uid": uids, "url": [f"http://127.0.0.1/{u}.jpg" for u in uids],
                      "caption": out, "source": pa.array(["bench"] * n)})
        if writer is None:
            writer = pq.ParquetWriter(tmp, t.schema)
        writer.write_table(t, row_group_size=131072)
    writer.close()
    tmp.rename(path)


# One method, in a fresh process: prints {"seconds", "matches", "peak_rss_mb"} as JSON.
_CHILD = r"""
import json, sys, time
from pathlib import Path
method, pool, entries, out, workers, mem = sys.argv[1:7]
import duckdb, pyarrow.parquet as pq
from pipeline import match
from pipeline.metadata import load_metadata
E = load_metadata(entries)
t0 = time.perf_counter()
if method == "peer":
    import numpy as np, pyarrow as pa, ahocorasick
    from pipeline.match import spacing  # MetaCLIP's substr_matching: one caption at a time
    A = ahocorasick.Automaton()
    for eid, e in zip(E.column("entry_id").to_pylist(), E.column("entry").to_pylist()):
        A.add_word(f" {e} ", (eid, e))
    A.make_automaton()
    Path(out).mkdir(parents=True, exist_ok=True)
    f = pq.ParquetFile(pool); n = 0; w = None
    for b in f.iter_batches(batch_size=131072, columns=["uid", "caption"]):
        rows, ids = [], []
        for i, c in enumerate(b.column(1).to_pylist()):
            m = {eid for _, (eid, _) in A.iter(spacing(c))}
            rows.extend([i] * len(m)); ids.extend(m)
        t = pa.table({"uid": b.column(0).take(pa.array(rows, pa.int64())),
                      "entry_id": pa.array(ids, pa.int64())})
        w = w or pq.ParquetWriter(Path(out) / "part-000000.parquet", t.schema)
        w.write_table(t); n += t.num_rows
    w.close()
else:
    con = duckdb.connect()
    con.execute(f"SET memory_limit='{mem}'; SET threads={int(workers)}")
    con.execute(f"SET temp_directory='{out}.spill'; SET preserve_insertion_order=false")
    n = match.match_parquet(con, Path(pool), E, Path(out), method, int(workers))
print(json.dumps({"seconds": time.perf_counter() - t0, "matches": n}))
"""


def _tree_rss_mb(root: int) -> float:
    """Resident memory of a process and all its descendants, from /proc (Linux)."""
    parent, rss = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            rss[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    tree, todo = set(), [root]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo.extend(c for c, pp in parent.items() if pp == p and c not in tree)
    return sum(rss.get(p, 0) for p in tree) / 2**20


def _dir_mb(d: Path) -> float:
    try:
        return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 2**20
    except OSError:  # files come and go while DuckDB spills
        return 0.0


def run_child(args: list[str], watch: Path | None = None) -> dict:
    """Run a Python child; return its last stdout line (JSON) plus the peak RSS of its tree.

    ru_maxrss is useless here: Linux carries it over fork+exec from this (large) parent.
    """
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, *args], stdout=out, stderr=err, env=env,
                             cwd=root, text=True)
        peak = spill = 0.0
        while p.poll() is None:
            peak = max(peak, _tree_rss_mb(p.pid))
            if watch is not None:
                spill = max(spill, _dir_mb(watch))
            time.sleep(0.5)
        out.seek(0)
        err.seek(0)
        if p.returncode != 0:
            raise RuntimeError(f"bench child {args[:3]} failed:\n{err.read()[-3000:]}")
        r = json.loads(out.read().strip().splitlines()[-1])
    r["peak_rss_mb"] = round(peak)
    if watch is not None:
        r["peak_spill_mb"] = round(spill)
    return r


def run_method(method: str, pool: Path, entries: Path, out: Path, workers: int,
               mem: str) -> dict:
    return run_child(["-c", _CHILD, method, str(pool), str(entries), str(out), str(workers),
                      mem], watch=Path(f"{out}.spill") if method == "duckdb" else None)


def same_pairs(a: Path, b: Path) -> int:
    """Pairs in one result and not the other (0 = identical sets)."""
    import duckdb

    con = duckdb.connect()
    q = lambda x, y: (f"SELECT count(*) FROM (SELECT uid, entry_id FROM read_parquet('{x}/*.parquet') "  # noqa: E501, E731
                      f"EXCEPT SELECT uid, entry_id FROM read_parquet('{y}/*.parquet'))")
    return con.execute(q(a, b)).fetchall()[0][0] + con.execute(q(b, a)).fetchall()[0][0]


def run_stage_bench(pool: Path, entries: Path, work: Path, rows: int, mem: str,
                    method: str) -> dict:
    from pipeline.config import load_build
    from pipeline.stage import get_spec, previous_stage, run_stage, stage_dir

    work.mkdir(parents=True, exist_ok=True)
    (work / "b.yaml").write_text(
        f"name: bench\nsources:\n  - path: none.csv\nruns_dir: {work / 'runs'}\n"
        f"duckdb:\n  memory_limit: {mem}\n  threads: 2\n"
        f"balance:\n  enabled: true\n  metadata: {entries}\n  target_size: {rows // 4}\n"
        f"  method: {method}\n  workers: 2\n")
    cfg = load_build(work / "b.yaml")
    up = stage_dir(cfg, previous_stage(cfg, get_spec("balance")))
    up.mkdir(parents=True, exist_ok=True)
    if not (up / "kept.parquet").exists():
        os.symlink(pool, up / "kept.parquet")
    (up / "report.json").write_text(json.dumps({"fingerprint": "bench", "kept": rows}))
    (up / "_SUCCESS").write_text("")
    r = run_stage(cfg, "balance", force=True, log=lambda s: print(s, file=sys.stderr))
    return {k: r[k] for k in ("rows_in", "kept", "dropped", "seconds", "rows_per_s", "t",
                              "expected_kept", "actual_kept", "matches", "method")}


_STAGE_CHILD = r"""
import json, sys
from pathlib import Path
from bench.bench_balance import run_stage_bench
pool, entries, work, rows, mem, method = sys.argv[1:7]
r = run_stage_bench(Path(pool), Path(entries), Path(work), int(rows), mem, method)
print(json.dumps(r))
"""


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_balance", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1M captions instead of 10M")
    ap.add_argument("--rows", type=int, default=0, help="override the caption count")
    ap.add_argument("--workers", type=int, default=2, help="processes / DuckDB threads")
    ap.add_argument("--memory-limit", default="2GB", help="DuckDB memory_limit (spills beyond)")
    ap.add_argument("--spill-limit", default="512MB",
                    help="also run the duckdb method under this memory_limit ('' to skip)")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "witforge_bench_balance"),
                    help="where the generated pool and entries are kept between runs")
    args = ap.parse_args(argv)
    rows = args.rows or (1_000_000 if args.quick else 10_000_000)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    entries = cache / "metadata.parquet"
    n_entries = make_entries(entries)
    pool = cache / f"pool_{rows}.parquet"
    make_pool(pool, rows)
    res: dict = {"rows": rows, "entries": n_entries, "cores": os.cpu_count(),
                 "workers": args.workers, "memory_limit": args.memory_limit, "methods": {}}
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        outs = {}
        runs = [("peer", "peer", args.memory_limit), ("ahocorasick", "ahocorasick",
                args.memory_limit), ("duckdb", "duckdb", args.memory_limit)]
        if args.spill_limit:  # the same join squeezed under a small memory_limit
            runs.append((f"duckdb@{args.spill_limit}", "duckdb", args.spill_limit))
        for m, method, mem in runs:
            outs[m] = Path(tmp) / m.replace("@", "_")
            r = run_method(method, pool, entries, outs[m], args.workers, mem)
            r["memory_limit"] = mem if method != "peer" else None
            r["captions_per_s"] = round(rows / r["seconds"])
            r["seconds"] = round(r["seconds"], 2)
            res["methods"][m] = r
            print(f"{m:12s} {r['seconds']:8.1f} s  {r['captions_per_s']:>10,} captions/s  "
                  f"{r['matches']:,} matches  peak {r['peak_rss_mb']:,} MB", file=sys.stderr)
        for m in [x for x, _, _ in runs if x != "peer"]:
            diff = same_pairs(outs["peer"], outs[m])
            res["methods"][m]["pairs_differing_from_peer"] = diff
            res["methods"][m]["ratio_vs_peer"] = round(
                res["methods"]["peer"]["seconds"] / res["methods"][m]["seconds"], 2)
            if diff:
                raise RuntimeError(f"{m}: {diff} pairs differ from pyahocorasick's result")
        fastest = max(("ahocorasick", "duckdb"),
                      key=lambda m: res["methods"][m]["captions_per_s"])
        res["fastest_method"] = fastest
        res["stage"] = run_child(["-c", _STAGE_CHILD, str(pool), str(entries),
                                  str(Path(tmp) / "stage"), str(rows), args.memory_limit,
                                  fastest])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
