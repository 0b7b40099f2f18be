"""Benchmark: img2dataset behind the guarding proxy vs img2dataset alone, and byte-drip URLs.

1. Throughput. The demo manifests (cc3m.tsv, laion.parquet, web.jsonl, with their faults) are
   downloaded from one demo web on 127.0.0.1 by ``img2dataset.download`` in a fresh process,
   with the crawl stage's arguments (``pipeline.crawl_attempt.download_kwargs``): once alone,
   once with ``http_proxy``/``https_proxy`` pointing at a GuardProxy. Runs alternate (ABBA) and
   medians of images/s are compared. Goal: guarded >= 0.95 x alone. The demo web is one host,
   so the guard's per-domain cap is set to img2dataset's total thread count: this measures the
   proxy's cost, not the politeness cap (which by design slows a one-host crawl).
2. Byte drips. Ten URLs on a hostile loopback server that send one byte a second, forever,
   added to a small demo manifest: the guarded crawl's wall time is compared with the same
   crawl without them (goal: the difference is within the deadline plus a little), and the
   unguarded crawl is run with a watchdog (twice the guarded time + 30 s) to show it does
   not finish.

    python -m bench.bench_guard            # the demo pool (Debian packages, else the fixture)
    python -m bench.bench_guard --quick    # the committed fixture pool, one run per side
Writes bench/results/guard.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import duckdb

from bench.img2dataset_peer import demo_sources_yaml, successes, write_peer_job

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "guard.json"
DATA = ROOT / "bench" / "data" / "guard"


def _build(manifests: Path, work: Path, name: str, per_shard: int, deadline: float,
           allow: list[str], extra_source: str = "") -> Path:
    y = work / f"{name}.yaml"
    y.write_text(
        f"name: {name}\nruns_dir: {work / 'runs'}\n" + demo_sources_yaml(manifests)
        + extra_source +
        "url_dedup: {enabled: false}\n"
        "crawl: {image_size: 64, resize_mode: center_crop, encode_quality: 90, timeout: 3,\n"
        f"        processes_count: 2, thread_count: 16, number_sample_per_shard: {per_shard},\n"
        f"        robots: false, guard: true, request_deadline: {deadline},\n"
        f"        per_domain_concurrency: 32, allow_hosts: {json.dumps(allow)}}}\n")
    return y


def crawl_once(cfg: Any, folder: Path, guarded: bool, kill_after: float = 0.0) -> dict[str, Any]:
    """img2dataset.download in a fresh process, through the guard or not."""
    from pipeline.crawl_attempt import worker_env
    from pipeline.guard.proxy import GuardProxy, crawl_timeout, settings_from_crawl

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # Alone: img2dataset's own per-read timeout; guarded: the timeout the crawl stage uses.
    cmd = write_peer_job(cfg, folder,
                         crawl_timeout(cfg.crawl) if guarded else cfg.crawl.timeout)
    env = {k: v for k, v in worker_env(cfg).items() if not k.lower().endswith("_proxy")}
    proxy = GuardProxy(settings_from_crawl(cfg.crawl), events_path=folder / "guard.jsonl")
    finished = True
    with open(folder / "peer.log", "wb") as log:
        if guarded:
            proxy.start()
            env.update(proxy.env())
        t = time.perf_counter()
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=folder, start_new_session=True)
            try:
                proc.wait(timeout=kill_after or None)
            except subprocess.TimeoutExpired:
                finished = False
                os.killpg(proc.pid, 9)
                proc.wait()
            secs = time.perf_counter() - t
        finally:
            proxy.stop()
    if finished and proc.returncode != 0:
        raise RuntimeError(f"img2dataset failed, see {folder / 'peer.log'}")
    images = successes(folder) if finished else None
    out = {"seconds": round(secs, 2), "finished": finished, "images": images,
           "images_per_s": round(images / secs, 2) if images else None}
    if guarded:
        out["guard"] = proxy.stats()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_guard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fixture pool, one run per side")
    p.add_argument("--repeats", type=int, default=0, help="runs per side (default 2, quick 1)")
    args = p.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    from pipeline.config import load_build
    from pipeline.demoweb.manifests import write_manifests
    from pipeline.demoweb.pool import assemble_pool
    from pipeline.demoweb.server import DemoWeb
    from pipeline.guard.hostile import HostileServer
    from pipeline.stage import run_stage

    repeats = args.repeats or (1 if args.quick else 2)
    work = DATA / ("quick" if args.quick else "full")
    # the manifests add derived copies to the pool folder: quick mode crawls a copy of the fixture
    pool = (assemble_pool(DATA / "quick_pool", prefer_system=False) if args.quick
            else assemble_pool(DATA / "pool"))
    per_shard = 100 if args.quick else 500
    deadline = 3.0  # = img2dataset's timeout alone, so slow URLs end at the same time
    quiet = {"log": lambda s: None}
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with DemoWeb(pool, slow_seconds=4) as web, HostileServer(drip_interval=1.0) as hostile:
        info = write_manifests(pool, web.base_url, work / "manifests", seed=0)
        allow = [web.host_port, f"127.0.0.1:{hostile.port}"]
        cfg = load_build(_build(work / "manifests", work, "tput", per_shard, deadline, allow))
        for name in ("ingest", "text_filter"):
            run_stage(cfg, name, **quiet)
        runs: dict[str, list[dict[str, Any]]] = {"guarded": [], "alone": []}
        for i in range(repeats):  # ABBA: drift in machine load hits both sides alike
            for side in (("guarded", "alone") if i % 2 == 0 else ("alone", "guarded")):
                r = crawl_once(cfg, work / side, side == "guarded")
                runs[side].append(r)
                print(f"  throughput {side}: {r}", flush=True)

        # Ten byte drips added to the first 200 demo rows.
        small = work / "small"
        small.mkdir()
        first = duckdb.sql(f"SELECT url, caption FROM '{run_dir_kept(cfg)}' ORDER BY uid "
                           "LIMIT 200").fetchall()
        drips = [f"{hostile.base_url}/drip?n={i}" for i in range(10)]
        for name, rows in (("plain", first), ("drips", first + [(u, "drip") for u in drips])):
            (small / f"{name}.jsonl").write_text("".join(
                json.dumps({"url": u, "caption": c}) + "\n" for u, c in rows))
        drip_runs = {}
        for name in ("plain", "drips"):
            y = small / f"{name}.yaml"
            y.write_text(f"name: {name}\nruns_dir: {small / 'runs'}\n"
                         f"sources: [{{path: {name}.jsonl}}]\nurl_dedup: {{enabled: false}}\n"
                         f"crawl: {{image_size: 64, resize_mode: center_crop, timeout: 3, "
                         f"processes_count: 2, thread_count: 16, robots: false, guard: true, "
                         f"request_deadline: {deadline}, per_domain_concurrency: 32, "
                         f"allow_hosts: {json.dumps(allow)}}}\n")
            c = load_build(y)
            for stage in ("ingest", "text_filter"):
                run_stage(c, stage, **quiet)
            drip_runs[f"guarded_{name}"] = crawl_once(c, small / f"g_{name}", True)
            print(f"  drips guarded_{name}: {drip_runs[f'guarded_{name}']}", flush=True)
            if name == "drips":
                # Long enough to be sure: twice the whole guarded crawl, plus half a minute.
                cap = 2 * drip_runs["guarded_drips"]["seconds"] + 30
                drip_runs["alone_drips"] = crawl_once(c, small / "a_drips", False, cap)
                print(f"  drips alone (killed after {cap:.0f}s if unfinished): "
                      f"{drip_runs['alone_drips']}", flush=True)

    g = statistics.median(r["images_per_s"] for r in runs["guarded"])
    a = statistics.median(r["images_per_s"] for r in runs["alone"])
    extra = drip_runs["guarded_drips"]["seconds"] - drip_runs["guarded_plain"]["seconds"]
    result = {
        "area": "guard",
        "command": "python -m bench.bench_guard" + (" --quick" if args.quick else ""),
        "pool": str(pool),
        "manifest_faults": info.get("faults"),
        "settings": {"image_size": 64, "processes_count": 2, "thread_count": 16,
                     "number_sample_per_shard": per_shard, "request_deadline": deadline,
                     "per_domain_concurrency": 32, "timeout_alone": 3},
        "guarded_runs": runs["guarded"], "alone_runs": runs["alone"], "drip_runs": drip_runs,
        "summary": {
            "guarded_images_per_s": g, "img2dataset_images_per_s": a,
            "ratio": round(g / a, 3) if a else None, "goal_ratio": ">= 0.95",
            "same_images": runs["guarded"][-1]["images"] == runs["alone"][-1]["images"],
            "drip_crawl_seconds": drip_runs["guarded_drips"]["seconds"],
            "plain_crawl_seconds": drip_runs["guarded_plain"]["seconds"],
            "drip_extra_seconds": round(extra, 2), "deadline": deadline,
            "goal_drip": "extra <= deadline + 2 s (bounded by the deadline, not the server)",
            "alone_with_drips_finished": drip_runs["alone_drips"]["finished"],
            "alone_with_drips_seconds": drip_runs["alone_drips"]["seconds"],
        },
        "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))
    return 0


def run_dir_kept(cfg: Any) -> Path:
    from pipeline.stage import kept_of

    return kept_of(cfg, "text_filter")


if __name__ == "__main__":
    sys.exit(main())
