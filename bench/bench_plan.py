"""Benchmark: `witforge plan` checked against real runs, predicted vs measured.

Two checks, each a small pilot and a run of the size it predicts, every run (and the plan) in
a fresh process, as a person would run them:

* text side: ingest -> text_filter -> url_dedup on bench_curation's generated manifest
  (wordfreq captions, URL variants, mojibake): the plan of a 100k-row pilot for 1M rows,
  against the 1M-row run;
* crawl: the demo manifests served by the demo web on 127.0.0.1 (its faults and noise
  included), ingest -> text_filter -> url_dedup -> robots -> crawl -> image_filter ->
  image_dedup -> shard with the demo's crawl settings behind the guard: the plan of a ~1k-row
  pilot for ~3k rows (a random third of them), against the 3k-row run.

Per stage: rows out, wall seconds and CPU seconds, predicted and measured, and their ratio.
Goal: every prediction within 25 % (issue 14). Writes bench/results/plan.json.

    python -m bench.bench_plan            # 100k -> 1M rows, and 1k -> 3k rows of the demo web
    python -m bench.bench_plan --quick    # 10k -> 100k, and the committed fixture pool
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import duckdb

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "plan.json"
DATA = ROOT / "bench" / "data"
WITFORGE = Path(sys.executable).parent / "witforge"
GOAL = 0.25
# The demo build's crawl settings (manifests/demo.yaml), robots on, behind the guard.
DEMO_CRAWL = ("crawl: {{image_size: 64, resize_mode: center_crop, encode_quality: 90, timeout: 3,"
              " processes_count: 2, thread_count: 16, number_sample_per_shard: 500, guard: true,"
              " request_deadline: 6, per_domain_concurrency: 32, robots: true, "
              "allow_hosts: ['{host}']}}")


# ---- builds on the demo web (shared with tests/test_plan.py) ------------------------------

def sample_sources(manifests: Path, out: Path, every: int) -> Path:
    """The demo manifests (cc3m.tsv, laion.parquet, web.jsonl), keeping the rows whose URL
    path hashes to 0 modulo ``every`` (every=1: all of them), in their own formats. The path,
    not the URL: the demo web's port changes from run to run, the sample does not."""
    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    path = "regexp_replace({col}, '^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*', '')"
    keep = f"hash({path} || 'witforge-plan') % {every} = 0"
    con.execute(f"COPY (SELECT * FROM read_csv('{manifests}/cc3m.tsv', header=false, "
                f"delim='\\t', quote='', all_varchar=true) WHERE {keep.format(col='column1')}) "
                f"TO '{out}/cc3m.tsv' (HEADER false, DELIMITER '\\t', QUOTE '')")
    con.execute(f"COPY (SELECT * FROM '{manifests}/laion.parquet' WHERE "
                f"{keep.format(col='URL')}) TO '{out}/laion.parquet' (FORMAT parquet)")
    con.execute(f"COPY (SELECT * FROM read_json('{manifests}/web.jsonl') WHERE "
                f"{keep.format(col='url')}) TO '{out}/web.jsonl' (FORMAT json)")
    return out


def demo_web_build(folder: Path, name: str, manifests: Path, every: int, crawl: str,
                   extra: str = "") -> Path:
    """A build over a sample of the demo manifests; returns its YAML."""
    src = sample_sources(manifests, folder / "sources", every)
    y = folder / "build.yaml"
    y.write_text(
        f"name: {name}\nruns_dir: {folder / 'runs'}\nsources:\n"
        f"  - {{path: {src}/cc3m.tsv, format: tsv, header: false, caption_col: column0, "
        "url_col: column1, tag: cc3m}\n"
        f"  - {{path: {src}/laion.parquet, url_col: URL, caption_col: TEXT, tag: laion}}\n"
        f"  - {{path: {src}/web.jsonl, url_col: url, caption_col: alt, tag: web}}\n"
        "text_filter: {filters: [junk_caption]}\n"
        f"{crawl}\nimage_filter: {{filters: [min_image_side, aspect_ratio], min_side: 16}}\n"
        f"decontaminate: {{enabled: false}}\n{extra}")
    return y


def run_build(build: Path, until: str = "") -> dict[str, dict[str, Any]]:
    """The build's enabled stages in order (up to ``until``) in this process; {stage: report}."""
    from pipeline.config import load_build
    from pipeline.stage import enabled_stages, run_stage

    cfg = load_build(build)
    out = {}
    for s in enabled_stages(cfg):
        out[s.name] = run_stage(cfg, s.name, log=lambda _: None)
        if s.name == until:
            break
    return out


def compare(plan: dict[str, Any], measured: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage of both: predicted and measured rows out, wall and CPU seconds, ratios."""
    out = []
    for row in plan["stages"]:
        r = measured.get(row["stage"])
        if r is None:
            continue
        pred = {"rows_out": row["rows_out"], "wall_s": row["wall_seconds"],
                "cpu_s": row["cpu_seconds"]}
        meas = {"rows_out": r["kept"], "wall_s": r["seconds"], "cpu_s": r.get("cpu_seconds")}
        out.append({"stage": row["stage"], "predicted": pred, "measured": meas,
                    "ratio": {k: round(pred[k] / meas[k], 3) if meas[k] else None
                              for k in pred}})
    return out


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    t: dict[str, Any] = {}
    for k in ("wall_s", "cpu_s"):
        p = sum(r["predicted"][k] for r in rows)
        m = sum(r["measured"][k] or 0 for r in rows)
        t[k] = {"predicted": round(p, 2), "measured": round(m, 2),
                "ratio": round(p / m, 3) if m else None}
    return t


# ---- fresh processes ----------------------------------------------------------------------

def _child(*args: str) -> dict[str, Any]:
    """`python -m bench.bench_plan --child ...` in a fresh process; its RESULT line."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "bench.bench_plan", "--child", *args],
                         capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    if out.returncode or "RESULT " not in out.stdout:
        raise RuntimeError(f"bench child {args} failed:\n{out.stdout[-2000:]}\n"
                           f"{out.stderr[-3000:]}")
    return json.loads(out.stdout[out.stdout.rindex("RESULT ") + 7:].splitlines()[0])


def _plan(build: Path, rows: int, out: Path, duplicates: str) -> dict[str, Any]:
    t = time.perf_counter()
    got = subprocess.run([str(WITFORGE), "plan", "--build", str(build), "--rows", str(rows),
                          "--duplicates", duplicates, "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT, check=False)
    if got.returncode:
        raise RuntimeError(f"witforge plan failed:\n{got.stdout[-2000:]}\n{got.stderr[-2000:]}")
    plan = json.loads(out.read_text())
    plan["plan_seconds"] = round(time.perf_counter() - t, 1)
    print(got.stdout.split("\n\nbasis")[0], flush=True)
    return plan


def check(name: str, pilot: Path, full: Path, work: Path, duplicates: str,
          until: str = "") -> dict[str, Any]:
    """Run the pilot and the full build, plan the full build's size from the pilot alone,
    compare. (The plan reads only the pilot's folder; the full run gives it its --rows.)"""
    piloted = _child("run", str(pilot), until)
    measured = _child("run", str(full), until)
    full_rows = measured["ingest"]["rows_in"]
    plan = _plan(pilot, full_rows, work / f"{name}_plan.json", duplicates)
    rows = compare(plan, measured)
    res = {"pilot_rows": piloted["ingest"]["rows_in"], "full_rows": full_rows,
           "duplicates": duplicates,
           "plan_seconds": plan["plan_seconds"], "stages": rows, "totals": totals(rows),
           "worst": _worst(rows)}
    for r in rows:
        p, m, q = r["predicted"], r["measured"], r["ratio"]
        print(f"  {name:5s} {r['stage']:13s} rows {p['rows_out']:>9,} vs {m['rows_out']:>9,} "
              f"({q['rows_out']})  wall {p['wall_s']:8.2f} vs {m['wall_s']:8.2f} s "
              f"({q['wall_s']})  cpu {p['cpu_s']:8.2f} vs {m['cpu_s'] or 0:8.2f} s "
              f"({q['cpu_s']})", flush=True)
    print(f"  {name:5s} total wall {res['totals']['wall_s']}, cpu {res['totals']['cpu_s']}",
          flush=True)
    return res


def _worst(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for k in ("rows_out", "wall_s", "cpu_s"):
        errs = [(abs(r["ratio"][k] - 1), r["stage"]) for r in rows if r["ratio"][k]]
        e, s = max(errs) if errs else (0.0, "")
        out[k] = {"stage": s, "error": round(e, 3), "within_goal": e <= GOAL}
    return out


# ---- the two checks -----------------------------------------------------------------------

def text_side(small: int, big: int, work: Path) -> dict[str, Any]:
    from bench.bench_curation import DATA as CURATION_DATA
    from bench.bench_curation import TEXT_FILTERS, make_manifest

    builds = {}
    for n in (small, big):
        manifest = make_manifest(n, CURATION_DATA / f"manifest_{n}.parquet")
        folder = work / f"text_{n}"
        folder.mkdir(parents=True, exist_ok=True)
        y = folder / "build.yaml"
        y.write_text(f"name: text_{n}\nruns_dir: {folder / 'runs'}\nsources:\n"
                     f"  - path: {manifest}\ntext_filter:\n  filters: {json.dumps(TEXT_FILTERS)}"
                     f"\nduckdb:\n  memory_limit: 4GiB\n  temp_directory: {folder / 'spill'}\n"
                     )
        builds[n] = y
    # the small manifest is the big one's first rows, and the generator repeats a pair in the
    # next row: the duplicate share is the same at any size (--duplicates rate)
    return check("text", builds[small], builds[big], work, "rate", until="url_dedup")


def text_against(pilot_rows: int, measured_file: Path, work: Path) -> dict[str, Any]:
    """The plan of a ``pilot_rows`` text-side pilot for the sizes a bench_curation run
    measured (its small and big runs, e.g. 10M and 100M: curation_100m.json), against them."""
    from bench.bench_curation import DATA as CURATION_DATA
    from bench.bench_curation import TEXT_FILTERS, make_manifest

    got = json.loads(measured_file.read_text())
    folder = work / f"text_{pilot_rows}"
    folder.mkdir(parents=True, exist_ok=True)
    manifest = make_manifest(pilot_rows, CURATION_DATA / f"manifest_{pilot_rows}.parquet")
    y = folder / "build.yaml"
    y.write_text(f"name: text_{pilot_rows}\nruns_dir: {folder / 'runs'}\nsources:\n"
                 f"  - path: {manifest}\ntext_filter:\n  filters: {json.dumps(TEXT_FILTERS)}"
                 f"\nduckdb:\n  memory_limit: 4GiB\n  temp_directory: {folder / 'spill'}\n")
    piloted = _child("run", str(y), "url_dedup")
    out: dict[str, Any] = {"pilot_rows": piloted["ingest"]["rows_in"],
                           "measured_file": str(measured_file.relative_to(ROOT))}
    for key, rows in (("witforge_small", got["rows_small"]), ("witforge", got["rows_big"])):
        run = got[key]
        measured = {s: {"kept": run[s]["kept"], "seconds": run[s]["seconds"],
                        "cpu_seconds": run[s]["cpu_s"]}
                    for s in ("ingest", "text_filter", "url_dedup")}
        plan = _plan(y, rows, work / f"text_plan_{rows}.json", "rate")
        stages = compare(plan, measured)
        out[str(rows)] = {"stages": stages, "totals": totals(stages), "worst": _worst(stages)}
        for r in stages:
            print(f"  {rows:>11,} {r['stage']:13s} wall {r['ratio']['wall_s']}  "
                  f"cpu {r['ratio']['cpu_s']}  rows {r['ratio']['rows_out']}", flush=True)
    return out


def crawl_side(quick: bool, every: int, work: Path, rows: int) -> dict[str, Any]:
    from pipeline.demoweb.manifests import write_manifests
    from pipeline.demoweb.pool import assemble_pool
    from pipeline.demoweb.server import DemoWeb

    # the manifests add derived copies to the pool folder: quick mode crawls a copy of the
    # fixture (as bench_crawl does, and in the same folders, so the two share their pools)
    pool = (assemble_pool(DATA / "crawl" / "quick_pool", prefer_system=False) if quick
            else assemble_pool(DATA / "crawl"))
    with DemoWeb(pool) as web:
        manifests = work / "manifests"
        info = write_manifests(pool, web.base_url, manifests, seed=0)
        # the full run: about `rows` of the manifests; the pilot: 1 in `every` of those (a
        # subset: a path hashing to 0 mod every x k hashes to 0 mod k)
        k = max(1, round(sum(info["rows"].values()) / rows))
        crawl = DEMO_CRAWL.format(host=web.host_port)
        pilot = demo_web_build(work / "crawl_pilot", "crawl_pilot", manifests, k * every, crawl)
        full = demo_web_build(work / "crawl_full", "crawl_full", manifests, k, crawl)
        return check("crawl", pilot, full, work, "sample")  # a random third of its rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10k -> 100k rows; the fixture pool")
    p.add_argument("--text-rows", default="", help="pilot,full rows of the text side "
                   "(default 100k,1M; quick 10k,100k)")
    p.add_argument("--crawl-rows", type=int, default=3000, help="rows of the full crawl, "
                   "drawn from the demo manifests (default 3000)")
    p.add_argument("--crawl-every", type=int, default=3, help="the crawl pilot keeps 1 row "
                   "in this many of the full's (default 3)")
    p.add_argument("--only", choices=["text", "crawl"], help="run one of the two checks")
    p.add_argument("--text-against", default="", metavar="RESULT_JSON",
                   help="instead: plan a --pilot-rows text pilot for the sizes of a "
                   "bench_curation result (e.g. bench/results/curation_100m.json: 10M and "
                   "100M) and compare; writes bench/results/plan_scale.json")
    p.add_argument("--pilot-rows", default="1M", help="the pilot of --text-against (1M)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        if args.child[0] == "run":
            reports = run_build(Path(args.child[1]), *args.child[2:])
            keep = ("rows_in", "kept", "seconds", "cpu_seconds", "cpu_seconds_children")
            print("RESULT " + json.dumps({k: {f: r.get(f) for f in keep}
                                          for k, r in reports.items()}))
        return 0
    from pipeline.plan_defaults import parse_rows

    small, big = (parse_rows(x) for x in (args.text_rows or (
        "10k,100k" if args.quick else "100k,1M")).split(","))
    work = DATA / "plan" / ("quick" if args.quick else "full")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    if args.text_against:
        scale = text_against(parse_rows(args.pilot_rows), Path(args.text_against).resolve(),
                             work)
        scale["summary"] = {k: {"worst": v["worst"], "totals": v["totals"]}
                            for k, v in scale.items() if isinstance(v, dict) and "worst" in v}
        scale["command"] = (f"python -m bench.bench_plan --text-against {args.text_against} "
                            f"--pilot-rows {args.pilot_rows}")
        from bench import write_results

        write_results(RESULTS.with_name("plan_scale.json"), scale)
        return 0
    res: dict[str, Any] = {"area": "plan", "command": "python -m bench.bench_plan"
                           + (" --quick" if args.quick else ""), "goal": f"within {GOAL:.0%}",
                           "cpus": os.cpu_count()}
    if args.only in (None, "text"):
        res["text"] = text_side(small, big, work)
    if args.only in (None, "crawl"):
        res["crawl"] = crawl_side(args.quick, args.crawl_every, work, args.crawl_rows)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["load_avg_1m"] = round(os.getloadavg()[0], 2)
    res["summary"] = {k: {"pilot_rows": res[k]["pilot_rows"], "full_rows": res[k]["full_rows"],
                          "worst": res[k]["worst"], "totals": res[k]["totals"]}
                      for k in ("text", "crawl") if k in res}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2))
    print(json.dumps(res["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
