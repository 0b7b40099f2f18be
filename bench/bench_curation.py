"""Text-side curation: ingest + text filters + url/caption dedup on a generated manifest.

The manifest (Parquet, like LAION/DataComp metadata) has N rows whose captions are drawn
from wordfreq's English word distribution (3-14 words, Zipf-weighted), with the mess of
real alt-text mixed in: ~3 % non-ASCII captions (half of them mojibake ftfy must repair),
junk captions (file names, URLs, "click here", digits), short captions, and ~10 % repeats
of a pair under a changed URL (tracking parameters, host case, default port, fragment).

Each run is a separate process (so peak RSS is its own) running the real stages with the
build's DuckDB memory_limit 4 GiB spilling to a temp folder. Figures: rows/s per core
(per CPU-second of the process, and wall time × cores), peak RSS, and the time ratio
between N/10 and N rows.
Peer, measured in the same run on the same file: the straightforward DuckDB query (regex
URL canonicalization, md5 uid, length/junk filters, DISTINCT ON).

    python -m bench.bench_curation            # 10M rows (and 1M for the ratio)
    python -m bench.bench_curation --quick    # 1M rows (and 100k)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb

BENCH_DIR = Path(__file__).parent
RESULTS = BENCH_DIR / "results"
DATA = Path(os.environ.get("WITFORGE_BENCH_DATA", "/tmp/witforge_bench"))
TEXT_FILTERS = ["caption_length", "junk_caption"]


def make_manifest(n: int, path: Path) -> Path:
    """Generate the manifest with DuckDB (deterministic: every draw hashes the row number)."""
    if path.exists():
        return path
    from wordfreq import top_n_list, word_frequency

    words = top_n_list("en", 30000)
    freqs = [word_frequency(w, "en") for w in words]
    total = sum(freqs)  # wordfreq's top-30k English words, renormalized
    cum, acc = [], 0.0
    for f in freqs:
        acc += f / total
        cum.append(acc)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute("SET memory_limit='4GB'")
    # 2^16 quantiles of the word distribution: a word draw is then one list index
    import bisect

    words_q = [words[min(bisect.bisect_left(cum, (q + 0.5) / 65536), len(words) - 1)]
               for q in range(65536)]
    con.execute("CREATE TABLE wl AS SELECT ?::VARCHAR[] AS words", [words_q])
    con.execute(f"""
    COPY (
      WITH base AS (
        SELECT i, hash(i, 'row') AS h, words FROM range({n}) t(i), wl
      ), gen AS (
        SELECT i, h,
          array_to_string(list_transform(range(3 + (h % 12)::INT),
              lambda j: words[1 + (hash(i, j) % 65536)::INT]), ' ') AS cap,
          'http://' || CASE WHEN h % 97 = 0 THEN 'IMG' ELSE 'img' END || (h % 5000) || '.example'
              || (['.com', '.org', '.net'])[1 + (h % 3)::INT] || '/p/' || (i * 7919 % 1000003)
              || '/' || md5(i::VARCHAR)[1:10] || '.jpg' AS u
        FROM base
      )
      SELECT
        -- ~10 %: repeat the previous row's pair under a changed URL form
        CASE
          WHEN h % 20 = 1 THEN replace(lag_u, 'http://img', 'http://IMG') || '?utm_source=x'
          WHEN h % 20 = 2 THEN replace(lag_u, '.example.com/', '.example.com:80/') || '#top'
          ELSE u END AS url,
        CASE
          WHEN h % 20 IN (1, 2) THEN lag_cap
          WHEN h % 100 = 3 THEN 'IMG_' || (h % 10000) || '.jpg'
          WHEN h % 100 = 4 THEN 'click here to enlarge ' || cap
          WHEN h % 100 = 5 THEN (h % 100000)::VARCHAR
          WHEN h % 100 = 6 THEN split_part(cap, ' ', 1)
          WHEN h % 200 = 7 THEN cap || ' café crème brûlée'
          WHEN h % 200 = 8 THEN cap || ' cafÃ© crÃ¨me'  -- mojibake for ftfy
          WHEN h % 200 = 9 THEN cap || ' — “quoted” naïve'
          WHEN h % 200 = 10 THEN cap || ' â€œquotedâ€\x9d'
          WHEN h % 200 = 11 THEN '東京 ' || cap
          WHEN h % 200 = 12 THEN cap || ' ½ €'
          ELSE cap END AS caption
      FROM (SELECT *, lag(u) OVER (ORDER BY i) AS lag_u, lag(cap) OVER (ORDER BY i) AS lag_cap
            FROM gen)
      ORDER BY i
    ) TO '{path}.tmp' (FORMAT parquet, ROW_GROUP_SIZE 122880)""")
    Path(f"{path}.tmp").rename(path)
    return path


PEER_SQL = """
WITH src AS (SELECT url, caption FROM read_parquet('{path}')),
canon AS (
  SELECT
    regexp_replace(regexp_replace(regexp_replace(lower(regexp_extract(url, '^[^/]*//[^/]*'))
        || regexp_replace(url, '^[^/]*//[^/]*', ''), '#.*$', ''),
        '([?&])(utm_[a-z]+|gclid|fbclid|mc_cid|mc_eid|ref)=[^&]*&?', '\\1', 'g'),
        '(:80|:443)/|[?&]$', '/', 'g') AS curl,
    trim(regexp_replace(caption, '\\s+', ' ', 'g')) AS caption, url
  FROM src
),
uid AS (SELECT md5(curl || chr(31) || caption) AS uid, * FROM canon),
filtered AS (
  SELECT * FROM uid
  WHERE length(caption) > 5 AND regexp_matches(caption, '\\S\\s+\\S+\\s+\\S')
    AND NOT regexp_matches(caption, '(?i)^\\s*[\\w\\-. ]*\\.(jpe?g|png|gif)\\s*$|https?://|www\\.'
        || '|click here|^[\\pP\\pS\\pN\\s]*$')
)
SELECT count(*) FROM (
  SELECT DISTINCT ON (curl, caption) * FROM filtered ORDER BY curl, caption, url)
"""


def _child(mode: str, manifest: Path, work: Path, filters: list[str]) -> dict:
    """Run one measurement in a fresh process; returns its wall/CPU seconds and peak RSS."""
    code = f"""
import json, resource, sys, time
sys.path.insert(0, {str(BENCH_DIR.parent)!r})
from bench.bench_curation import _measure
print("RESULT " + json.dumps(_measure({mode!r}, {str(manifest)!r}, {str(work)!r}, {filters!r})))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    if out.returncode:
        raise RuntimeError(f"bench child {mode} failed:\n{out.stderr[-3000:]}")
    if "RESULT " not in out.stdout:
        raise RuntimeError(f"bench child {mode} printed no RESULT:\n{out.stdout[-3000:]}")
    line = out.stdout[out.stdout.rindex("RESULT ") + len("RESULT "):].splitlines()[0]
    return json.loads(line)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_kib() -> int:
    """This process's peak RSS. Not ru_maxrss: a forked child starts with its parent's
    (the manifest generator's) figure, and getrusage keeps it across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> None:
    """Start a new peak (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _measure(mode: str, manifest: str, work: str, filters: list[str]) -> dict:
    w = Path(work)
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    result: dict = {}
    if mode == "peer":
        con = duckdb.connect()
        con.execute(f"SET memory_limit='4GB'; SET temp_directory='{w / 'spill'}'; "
                    "SET enable_progress_bar = false")
        result["kept"] = con.execute(PEER_SQL.format(path=manifest)).fetchall()[0][0]
    else:
        from pipeline.config import load_build
        from pipeline.stage import run_stage

        (w / "build.yaml").write_text(
            f"name: bench\nruns_dir: {w / 'runs'}\nsources:\n  - path: {manifest}\n"
            f"text_filter:\n  filters: {json.dumps(filters)}\n"
            f"duckdb:\n  memory_limit: 4GiB\n  temp_directory: {w / 'spill'}\n")
        cfg = load_build(w / "build.yaml")
        for stage in ("ingest", "text_filter", "url_dedup"):
            s0, c0 = time.perf_counter(), _cpu()
            _reset_peak_rss()
            rep = run_stage(cfg, stage, log=lambda s: None)
            result[stage] = {"seconds": round(time.perf_counter() - s0, 2),
                             "cpu_s": round(_cpu() - c0, 2),
                             "peak_rss_gib": round(_peak_rss_kib() / 2**20, 2),
                             "rows_in": rep["rows_in"], "kept": rep["kept"],
                             "dropped_by_reason": rep["dropped_by_reason"]}
        result["kept"] = rep["kept"]
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    result.update(wall_s=round(wall, 2),
                  cpu_s=round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 2),
                  peak_rss_gib=max([round(_peak_rss_kib() / 2**20, 2)] + [
                      v["peak_rss_gib"] for v in result.values() if isinstance(v, dict)]))
    shutil.rmtree(w, ignore_errors=True)
    return result


def _rates(r: dict, rows: int, cores: int) -> dict:
    return {**r, "rows": rows, "rows_per_s_per_core": round(rows / r["wall_s"] / cores),
            "rows_per_cpu_s": round(rows / max(r["cpu_s"], 1e-9))}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench_curation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1M rows (ratio from 100k) instead "
                   "of 10M (ratio from 1M)")
    p.add_argument("--rows", type=int, default=0, help="override the large size")
    p.add_argument("--skip-english", action="store_true",
                   help="do not measure the variant with the english (CLD2) filter")
    args = p.parse_args(argv)
    big = args.rows or (1_000_000 if args.quick else 10_000_000)
    small = big // 10
    cores = os.cpu_count() or 1
    work = DATA / "work"
    res: dict = {"area": "curation", "cores": cores, "memory_limit": "4GiB",
                 "text_filters": TEXT_FILTERS, "rows_small": small, "rows_big": big}
    for n in (small, big):
        t = time.perf_counter()
        make_manifest(n, DATA / f"manifest_{n}.parquet")
        print(f"manifest {n:,} rows ready ({time.perf_counter() - t:.0f}s)", file=sys.stderr)
    for n, key in ((small, "witforge_small"), (big, "witforge")):
        res[key] = _rates(_child("witforge", DATA / f"manifest_{n}.parquet", work,
                                 TEXT_FILTERS), n, cores)
        print(f"{key}: {json.dumps(res[key])}", file=sys.stderr)
    res["peer"] = _rates(_child("peer", DATA / f"manifest_{big}.parquet", work, []), big, cores)
    print(f"peer: {json.dumps(res['peer'])}", file=sys.stderr)
    if not args.skip_english:
        res["witforge_english_small"] = _rates(_child(
            "witforge", DATA / f"manifest_{small}.parquet", work, TEXT_FILTERS + ["english"]),
            small, cores)
    ours, peer = res["witforge"], res["peer"]
    # Per core = per CPU-second: with other jobs sharing the cores, wall time measures the
    # machine's load; the process's CPU time is what this work costs a core.
    res["summary"] = {
        "rows": big,
        "rows_per_s_per_core": ours["rows_per_cpu_s"],
        "stage_cpu_s": {s: ours[s]["cpu_s"] for s in ("ingest", "text_filter", "url_dedup")},
        "peer_rows_per_s_per_core": peer["rows_per_cpu_s"],
        "speedup_vs_peer": round(peer["cpu_s"] / ours["cpu_s"], 2),
        "wall_rows_per_s_per_core": ours["rows_per_s_per_core"],
        "peak_rss_gib": ours["peak_rss_gib"],
        "ratio_small_to_big_cpu": round(ours["cpu_s"] / res["witforge_small"]["cpu_s"], 2),
        "ratio_small_to_big_wall": round(ours["wall_s"] / res["witforge_small"]["wall_s"], 2),
        "load_average_1m": round(os.getloadavg()[0], 1),
        "goals": {"rows_per_s_per_core": 1_000_000, "peak_gib": 4, "ratio": 11},
    }
    if "witforge_english_small" in res:
        e = res["witforge_english_small"]
        res["summary"]["with_english_rows_per_s_per_core"] = e["rows_per_cpu_s"]
        res["summary"]["english_filter_captions_per_cpu_s"] = round(
            e["text_filter"]["rows_in"]
            / max(e["text_filter"]["cpu_s"] - res["witforge_small"]["text_filter"]["cpu_s"],
                  1e-9))
    RESULTS.mkdir(parents=True, exist_ok=True)
    res["quick"] = args.quick
    (RESULTS / "curation.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
