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
import dataclasses
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
    "ingest": "sources", "text_filter": "rows", "url_dedup": "rows",
    "precrawl_balance": "rows", "crawl": "crawl", "image_filter": "rows", "image_dedup": "tar",
    "decontaminate": "tar", "clip_filter": "rows", "balance": "rows", "shard": "tar",
}
NOT_CALIBRATED = {
    "robots": "fetches every host's robots.txt: calibrating would touch the network; its "
              "time is split per origin instead",
    "embed": "loads or trains a model: its fixed part is read from the bootstrap's fold "
             "training times instead",
    "semantic_dedup": "reads the embed stage's folder",
}
SAMPLE_ROWS = 1000
# Stages that start a pool of spawned processes, and the module each process imports:
# img2dataset's download processes (at the first shard and again every 5 shards, its
# maxtasksperchild), image_dedup's pHash pool (only for 16 MiB of tars or more).
WORKER_MODULES = {"crawl": "img2dataset.downloader", "image_dedup": "dedup.phash"}
REFUSED_URL = "http://127.0.0.1:9/witforge-plan-calibration.jpg"  # discard port: refused


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
        work = folder.with_name(folder.name + ".work")
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
            if old and old.get("fingerprint") == m.fingerprint and "seconds" in old:
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
            m.calibration["fingerprint"] = m.fingerprint
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _scratch_cfg(cfg: BuildConfig, root: Path) -> BuildConfig:
    s = copy.deepcopy(cfg)
    s.runs_dir = str(root)
    s.duckdb.temp_directory = str(root / "_duckdb_tmp")
    return s


def _run_sample(cfg: BuildConfig, m: StageMeasure, how: str, root: Path) -> dict[str, Any]:
    scfg = _scratch_cfg(cfg, root)
    spec = _spec(cfg, m.name)
    n = max(1, min(SAMPLE_ROWS, m.rows_in // 20))
    con = duckdb.connect()
    if how == "sources":
        scfg.sources = _short_sources(cfg, root / "sources", n, con)
    else:
        prev = previous_stage(cfg, spec)
        if prev is None:
            raise StageError("no upstream stage")
        src, dst = stage_dir(cfg, prev), stage_dir(scfg, prev)
        dst.mkdir(parents=True)
        kept = f"read_parquet('{src / 'kept.parquet'}')"
        if how == "rows":
            query = f"SELECT * FROM {kept} ORDER BY uid LIMIT {n}"
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
    with contextlib.redirect_stderr(io.StringIO()):  # the sample run's progress bars
        r = run_stage(scfg, m.name, force=True, log=lambda s: None)
    out = {"how": how, "rows": int(r["rows_in"]), "seconds": float(r["seconds"]),
           "cpu_seconds": r.get("cpu_seconds")}
    if m.name in WORKER_MODULES:
        out.update(worker_start(WORKER_MODULES[m.name]))
    return out


def worker_start(module: str) -> dict[str, float]:
    """What starting one worker process of a stage's pool costs here: a fresh interpreter
    that imports the module its tasks live in, as each spawned pool process does."""
    before, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True,
                   capture_output=True, cwd=Path(__file__).resolve().parents[1])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"worker_start_seconds": round(time.monotonic() - t, 3),
            "worker_start_cpu_seconds": round(cpu, 3)}


def _short_sources(cfg: BuildConfig, out: Path, n: int, con: duckdb.DuckDBPyConnection) -> list:
    """Each source file's first rows, in its own format (gzip dropped: the name says so)."""
    from pipeline.ingest_sources import detect_format, source_files

    out.mkdir(parents=True)
    files = source_files(cfg)
    per_file = max(1, n // len(files))
    sources = []
    for k, (_, src, path) in enumerate(files):
        fmt = detect_format(path, src.format)
        name = path.name.removesuffix(".gz").removesuffix(".GZ")
        dst = out / f"{k:03d}_{name}"
        if fmt == "parquet":
            con.execute(f"COPY (SELECT * FROM read_parquet('{path}') LIMIT {per_file}) "
                        f"TO '{dst}' (FORMAT parquet)")
        elif fmt in ("csv", "tsv", "jsonl"):
            opener = _gzip_open if path.name.lower().endswith(".gz") else open
            keep = per_file + (1 if fmt in ("csv", "tsv") and src.header else 0)
            with opener(path, "rb") as f, open(dst, "wb") as g:
                for i, line in enumerate(f):
                    if i >= keep:
                        break
                    g.write(line)
        else:
            raise StageError(f"{path}: a {fmt} source cannot be cut short line by line")
        sources.append(dataclasses.replace(src, path=str(dst), format=fmt,
                                           tag=src.tag or path.name.split(".")[0]))
    return sources


def _gzip_open(path: Path, mode: str) -> Any:
    import gzip

    return gzip.open(path, mode)
