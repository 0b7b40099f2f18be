"""What `witforge plan` reads from a finished pilot build, and its start-up calibration.

Per stage: rows in and kept, wall and CPU seconds (report.json), the bytes of its folder and
work folder, and the bytes of its input. For the crawl also img2dataset's shard stats (shard
durations, hence the mean request time), the rows per host of its input, the robots
Crawl-delays, the success rate and the stored bytes per image. The training summary.

A small pilot's times are partly start-up (imports, a process pool, img2dataset's ~5 s), which
a larger run pays once, not per row. So the planner runs each stage once more on a tiny
sample of its own pilot input, in a scratch folder, and splits its cost into a fixed part and
a per-row part from the two points (`calibrate`). The crawl's sample is one row whose URL
points at a closed loopback port, so calibrating downloads nothing.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from pipeline.config import BuildConfig
from pipeline.plan_grow import copies_for, grown_rows_query, grown_sources, short_sources
from pipeline.robots import CACHE as ROBOTS_CACHE
from pipeline.stage import (
    StageError,
    enabled_stages,
    previous_stage,
    read_report,
    run_stage,
    stage_dir,
)

HOSTS_SQL = Path(__file__).parent / "sql" / "plan_hosts.sql"
# How each stage is calibrated: its sources cut short (ingest), a sample of its input rows,
# every row of one crawl tar (stages that read images: their cost follows the tars), one
# refused URL (crawl); None: not calibrated, with the reason.
CALIBRATION: dict[str, str] = {
    "ingest": "sources", "text_filter": "rows", "url_dedup": "rows", "precrawl_balance": "rows",
    "robots": "rows", "crawl": "crawl", "image_filter": "rows", "image_dedup": "tar",
    "decontaminate": "tar", "clip_filter": "rows", "balance": "rows", "shard": "tar",
}
NOT_CALIBRATED = {
    "embed": "loads or trains a model: its fixed part is read from the bootstrap's fold "
             "training times instead",
    "semantic_dedup": "reads the embed stage's folder",
}
SAMPLE_ROWS = 1000
SPLIT_PARTS = 4  # url_dedup's candidates compared in this many hash parts, to time the split
# Stages that start a pool of spawned processes, and the module each process imports:
# img2dataset's download processes (at the first shard and again every 5 shards, its
# maxtasksperchild), image_dedup's pHash pool (only for 16 MiB of tars or more).
WORKER_MODULES = {"crawl": "img2dataset.downloader", "image_dedup": "dedup.phash"}
REFUSED_URL = "http://127.0.0.1:9/witforge-plan-calibration.jpg"  # discard port: refused
# The report keys of a stage's (seconds, CPU seconds) spent once per distinct key, not per
# row: ingest's ftfy repair per distinct caption, robots' fetches per origin (its CPU share
# is the fetch's share of the wall). Kept apart when fitting the per-row cost.
PER_KEY_SECONDS = {"ingest": ("ftfy_seconds", "ftfy_cpu_seconds"),
                   "robots": ("robots_fetch_seconds", None)}
# Bumped when a calibration's contents change: plan.json's older calibrations are redone.
CALIBRATION_VERSION = 3  # 2: repeated inputs, robots, worker starts; 3: url split


@dataclass
class StageMeasure:
    name: str
    folder: str
    rows_in: int
    kept: int
    seconds: float
    cpu_seconds: float | None  # None: a report written before witforge recorded CPU time
    cores: int
    disk_bytes: int  # the stage folder and its work folder
    work_bytes: int
    input_bytes: int
    fingerprint: str
    report: dict[str, Any]
    calibration: dict[str, Any] | None = None


@dataclass
class CrawlFacts:
    processes: int
    threads: int
    per_shard: int
    shards: int
    samples: int
    successes: int
    shard_seconds: float  # the sum of img2dataset's shard durations
    shard_span_seconds: float  # first shard start to last shard end, summed over attempts
    mean_request_s: float | None  # shard seconds x threads / samples (an upper bound)
    stored_bytes_per_image: float | None
    hosts: list[tuple[str, int]]  # the busiest hosts of the input, rows each
    host_count: int
    crawl_delays: dict[str, float]
    loopback: bool  # the pilot crawled 127.0.0.0/8 or localhost only (the demo web)


@dataclass
class Pilot:
    cfg: BuildConfig
    stages: list[StageMeasure]
    cores: int
    crawl: CrawlFacts | None = None
    train: dict[str, Any] | None = None
    embed_device: str | None = None
    missing: list[str] = field(default_factory=list)  # enabled stages without a report


def _bytes(path: Path) -> int:
    total = 0
    if not path.exists():
        return 0
    for root, _, files in os.walk(path):  # symlinks are not followed
        for f in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / f).lstat().st_size
    return total


def read_pilot(cfg: BuildConfig) -> Pilot:
    """Every finished stage of the build, in order (a stage without report.json ends it)."""
    stages: list[StageMeasure] = []
    missing = []
    for spec in enabled_stages(cfg):
        folder = stage_dir(cfg, spec)
        r = read_report(folder) if not missing else None
        if r is None:
            missing.append(spec.name)
            continue
        prev = previous_stage(cfg, spec)
        inp = stage_dir(cfg, prev) / "kept.parquet" if prev else None
        work = _work_dir(cfg, spec)
        stages.append(StageMeasure(
            name=spec.name, folder=spec.folder, rows_in=int(r["rows_in"]), kept=int(r["kept"]),
            seconds=float(r["seconds"]), cpu_seconds=r.get("cpu_seconds"),
            cores=int(r.get("cores") or len(os.sched_getaffinity(0))),
            disk_bytes=_bytes(folder) + _bytes(work), work_bytes=_bytes(work),
            input_bytes=inp.stat().st_size if inp and inp.exists() else 0,
            fingerprint=str(r.get("fingerprint", "")), report=r))
    if not stages:
        raise StageError(f"build {cfg.name} has no finished stage under "
                         f"{cfg.run_dir}: run the pilot first (witforge run --build {cfg.path})")
    pilot = Pilot(cfg, stages, cores=max(s.cores for s in stages), missing=missing)
    names = {s.name for s in stages}
    if "crawl" in names:
        pilot.crawl = crawl_facts(cfg)
    summary = cfg.run_dir / "train" / "summary.json"
    if summary.is_file():
        pilot.train = json.loads(summary.read_text())
    manifest = stage_dir(cfg, _spec(cfg, "embed")) / "manifest.json" if "embed" in names \
        else None
    if manifest is not None and manifest.is_file():
        pilot.embed_device = json.loads(manifest.read_text()).get("device")
    return pilot


def _spec(cfg: BuildConfig, name: str) -> Any:
    return next(s for s in enabled_stages(cfg) if s.name == name)


def crawl_facts(cfg: BuildConfig) -> CrawlFacts:
    from pipeline.crawl import attempts
    from pipeline.robots import crawl_delays

    spec = _spec(cfg, "crawl")
    folder = stage_dir(cfg, spec)
    shards = samples = successes = 0
    shard_seconds = span = 0.0
    for a in attempts(folder.with_name(folder.name + ".work")):
        starts, ends = [], []
        for p in a.stats_files():
            s = json.loads(p.read_text())
            shards += 1
            samples += int(s["count"])
            successes += int(s["successes"])
            starts.append(float(s["start_time"]))
            ends.append(float(s["end_time"]))
            shard_seconds += max(0.0, ends[-1] - starts[-1])
        if starts:
            span += max(0.0, max(ends) - min(starts))
    c = cfg.crawl
    con = duckdb.connect()
    stored = con.execute(f"SELECT avg(bytes) FROM read_parquet('{folder / 'kept.parquet'}') "
                         "WHERE bytes IS NOT NULL").fetchall()[0][0]
    prev = previous_stage(cfg, spec)
    hosts: list[tuple[str, int]] = []
    if prev is not None:
        sql = HOSTS_SQL.read_text().format(input=stage_dir(cfg, prev) / "kept.parquet")
        hosts = [(h, int(n)) for h, n in con.execute(sql).fetchall()]
    loop = bool(hosts) and all(h == "localhost" or h.startswith("127.") or h == "::1"
                               for h, _ in hosts)
    return CrawlFacts(
        processes=c.processes_count, threads=c.thread_count, per_shard=c.number_sample_per_shard,
        shards=shards, samples=samples, successes=successes, shard_seconds=shard_seconds,
        shard_span_seconds=span,
        mean_request_s=shard_seconds * c.thread_count / samples if samples else None,
        stored_bytes_per_image=float(stored) if stored is not None else None,
        hosts=hosts[:20], host_count=len(hosts), crawl_delays=crawl_delays(cfg), loopback=loop)


# ---- calibration ----------------------------------------------------------------------------

def calibrate(pilot: Pilot, cache: dict[str, Any] | None = None,
              skip: dict[str, str] | None = None) -> None:
    """Set ``calibration`` on every stage that can be run again on a tiny sample: {rows,
    seconds, cpu_seconds} of that run, or {skipped: why}. ``cache`` is the last plan.json's
    calibrations by stage: reused when the stage's fingerprint is unchanged; ``skip``: stage
    -> why it is not calibrated this time."""
    cfg = pilot.cfg
    scratch = cfg.run_dir / f".plan-calibration-{os.getpid()}"
    try:
        for m in pilot.stages:
            old = (cache or {}).get(m.name)
            if (old and old.get("fingerprint") == m.fingerprint and "seconds" in old
                    and old.get("version") == CALIBRATION_VERSION):
                m.calibration = old
                continue
            how = CALIBRATION.get(m.name)
            if how is None or m.name in (skip or {}):
                m.calibration = {"skipped": (skip or {}).get(m.name) or NOT_CALIBRATED.get(
                    m.name, "not calibrated")}
                continue
            try:
                m.calibration = _run_sample(cfg, m, how, scratch / m.name)
            except (StageError, duckdb.Error, OSError, ValueError) as e:
                m.calibration = {"skipped": f"calibration failed: {e}".splitlines()[0][:300]}
            m.calibration.update(fingerprint=m.fingerprint, version=CALIBRATION_VERSION)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _scratch_cfg(cfg: BuildConfig, root: Path) -> BuildConfig:
    s = copy.deepcopy(cfg)
    s.runs_dir = str(root)
    s.duckdb.temp_directory = str(root / "_duckdb_tmp")
    return s


def _run_sample(cfg: BuildConfig, m: StageMeasure, how: str, root: Path) -> dict[str, Any]:
    con = duckdb.connect()
    n = max(1, min(SAMPLE_ROWS, m.rows_in // 20))
    out = {"how": how, **_timed_run(cfg, m, how, root / "sample", con, rows=n)}
    copies = copies_for(m.rows_in) if how in ("rows", "sources") else 0
    if copies:  # a small pilot: its per-row cost measured on its input repeated (plan_grow)
        out["grown"] = {"copies": copies,
                        **_timed_run(cfg, m, how, root / "grown", con, copies=copies)}
    if m.name == "url_dedup" and m.report.get("candidates"):
        # the split a big build's candidates need and a pilot's never do: timed both ways
        # on the same input (the repeated one, if any: more candidates)
        size = {"copies": copies} if copies else {"rows": m.rows_in}
        out["split"] = {f"parts_{n}": _timed_run(cfg, m, how, root / f"parts_{n}", con,
                                                 options={"compare_parts": n}, **size)
                        for n in (1, SPLIT_PARTS)}
    if m.name in WORKER_MODULES:
        out.update(worker_start(WORKER_MODULES[m.name]))
    if m.name == "image_dedup" and cfg.image_dedup.phash and cfg.image_dedup.workers > 1:
        out["phash_pool"] = phash_pool_run(cfg, m, root / "phash_pool", con)
    return out


def phash_pool_run(cfg: BuildConfig, m: StageMeasure, root: Path,
                   con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """pHash the pilot's tars once more on image_dedup's spawned pool, which a pilot's few
    MiB of tars never start but a big build does: its processes, images, wall seconds and
    CPU seconds (the pool's processes, started, hashing, terminated)."""
    from dedup.phash import hash_tars

    spec = _spec(cfg, m.name)
    prev = previous_stage(cfg, spec)
    if prev is None:
        raise StageError("no upstream stage")
    kept = stage_dir(cfg, prev) / "kept.parquet"
    tars = [str(cfg.run_dir / t) for (t,) in con.execute(
        f"SELECT DISTINCT tar FROM read_parquet('{kept}') WHERE tar IS NOT NULL").fetchall()]
    stats: dict[str, Any] = {}
    before, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    with contextlib.redirect_stderr(io.StringIO()):
        hash_tars(tars, root, cfg.image_dedup.workers, decode=cfg.image_dedup.phash_decode,
                  stats=stats, min_parallel_bytes=0)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"processes": stats.get("processes", 0), "tars": len(tars),
            "images": stats.get("images", 0), "seconds": round(time.monotonic() - t, 3),
            "cpu_seconds": round((after.ru_utime + after.ru_stime)
                                 - (before.ru_utime + before.ru_stime), 3)}


def _timed_run(cfg: BuildConfig, m: StageMeasure, how: str, root: Path,
               con: duckdb.DuckDBPyConnection, rows: int = 0, copies: int = 0,
               options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run stage ``m`` in a scratch build under ``root`` on ``rows`` rows of its pilot input
    or on ``copies`` copies of all of it; its rows, seconds and CPU seconds."""
    from pipeline.ingest_sources import source_files

    scfg = _scratch_cfg(cfg, root)
    spec = _spec(cfg, m.name)
    if how == "sources":
        scfg.sources = (grown_sources(source_files(cfg), root / "sources", copies, con)
                        if copies else short_sources(source_files(cfg), root / "sources", rows,
                                                     con))
    else:
        prev = previous_stage(cfg, spec)
        if prev is None:
            raise StageError("no upstream stage")
        src, dst = stage_dir(cfg, prev), stage_dir(scfg, prev)
        dst.mkdir(parents=True)
        kept = f"read_parquet('{src / 'kept.parquet'}')"
        if copies:
            query = grown_rows_query(kept, m.name, copies)
        elif how == "rows":
            query = f"SELECT * FROM {kept} ORDER BY uid LIMIT {rows}"
        elif how == "crawl":
            query = (f"SELECT * REPLACE ('plan-calibration' AS uid, '{REFUSED_URL}' AS url) "
                     f"FROM {kept} LIMIT 1")
        else:  # every row of the first crawl tar, which the scratch run reads through a link
            first = con.execute(f"SELECT min(tar) FROM {kept}").fetchall()[0][0]
            if first is None:
                raise StageError("its input has no crawl tar")
            top = Path(first).parts[0]
            (scfg.run_dir / top).symlink_to(cfg.run_dir / top, target_is_directory=True)
            query = f"SELECT * FROM {kept} WHERE tar = '{first}' ORDER BY uid"
        con.execute(f"COPY ({query}) TO '{dst / 'kept.parquet'}' (FORMAT parquet)")
        shutil.copyfile(src / "report.json", dst / "report.json")
        (dst / "_SUCCESS").write_text("")
    if m.name == "robots":  # the pilot's answers: the sample's origins are all asked already
        cache = _work_dir(cfg, spec) / ROBOTS_CACHE
        if not cache.is_file():
            raise StageError(f"no robots.txt answers cached in {cache}: calibrating would "
                             "fetch them")
        _work_dir(scfg, spec).mkdir(parents=True)
        shutil.copyfile(cache, _work_dir(scfg, spec) / ROBOTS_CACHE)
    with contextlib.redirect_stderr(io.StringIO()):  # the sample run's progress bars
        r = run_stage(scfg, m.name, force=True, options=options, log=lambda s: None)
    out = {"rows": int(r["rows_in"]), "kept": int(r["kept"]), "seconds": float(r["seconds"]),
           "cpu_seconds": r.get("cpu_seconds")}
    keep = [*PER_KEY_SECONDS.get(m.name, ()), "robots_fetched",  # robots: asked nothing
            "candidates", "compare_parts"]
    out.update({k: r[k] for k in keep if k and k in r})
    return out


def _work_dir(cfg: BuildConfig, spec: Any) -> Path:
    folder = stage_dir(cfg, spec)
    return folder.with_name(folder.name + ".work")


# One spawned pool process importing a module, ended the way a pool ends (terminate: no
# interpreter teardown), in a fresh interpreter whose own start is not counted.
_SPAWN_ONE = """
import json, resource, sys, time
from multiprocessing import get_context
t = time.monotonic()
with get_context("spawn").Pool(1) as pool:
    pool.apply(exec, ("import " + sys.argv[1],))
    pool.terminate()
    pool.join()
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps([time.monotonic() - t, r.ru_utime + r.ru_stime]))
"""


def worker_start(module: str) -> dict[str, float]:
    """What starting one worker process of a stage's pool costs here: a spawned process
    (img2dataset's pool and image_dedup's are spawn pools) that imports the module its
    tasks live in and is then terminated, as a pool's processes are."""
    got = subprocess.run([sys.executable, "-c", _SPAWN_ONE, module], check=True,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    wall, cpu = json.loads(got.stdout.strip().splitlines()[-1])
    return {"worker_start_seconds": round(wall, 3), "worker_start_cpu_seconds": round(cpu, 3)}
