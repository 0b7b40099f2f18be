"""The stage contract: one folder per stage, written atomically, skipped when unchanged.

A stage module exposes ``run(ctx: StageContext) -> dict``. It reads
``ctx.input_path`` (the previous stage's ``kept.parquet``), writes
``kept.parquet`` and ``dropped.parquet`` into ``ctx.out_dir`` (a temporary
folder) and returns extra report fields. The runner counts rows, writes
``report.json`` and ``_SUCCESS``, then renames the folder into place, so an
interrupted stage leaves nothing half-written.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import importlib
import importlib.util
import json
import os
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from pipeline.config import RUN_ONLY_SETTINGS, BuildConfig, parse_size

# (old report, today's stage_inputs, upstream spec) -> what changed, in words
Explain = Callable[[dict[str, Any], dict[str, Any], "StageSpec | None"], list[str]]

DROPPED_COLUMNS = "uid VARCHAR, stage VARCHAR, reason VARCHAR, detail VARCHAR"


class StageError(RuntimeError):
    """A stage cannot run: bad input, a missing upstream stage, a failed tool."""


@dataclass(frozen=True)
class StageSpec:
    number: int
    name: str
    module: str
    settings: tuple[str, ...]  # config sections whose values the stage depends on
    enabled: Callable[[BuildConfig], bool] = lambda cfg: True

    @property
    def folder(self) -> str:
        return f"{self.number:02d}_{self.name}"


# The order of a build. MetaCLIP balances last, after download and dedup, so the final
# counts are the real ones; the optional pre-crawl balance only saves bandwidth.
STAGES: list[StageSpec] = [
    StageSpec(1, "ingest", "pipeline.ingest", ("sources", "ingest")),
    StageSpec(2, "text_filter", "pipeline.filter", ("text_filter",)),
    StageSpec(3, "url_dedup", "dedup.url", ("url_dedup",),
              lambda c: c.url_dedup.enabled),
    StageSpec(4, "precrawl_balance", "pipeline.balance", ("precrawl_balance",),
              lambda c: c.precrawl_balance.enabled),
    StageSpec(5, "robots", "pipeline.robots", ("crawl",), lambda c: c.crawl.robots),
    StageSpec(6, "crawl", "pipeline.crawl", ("crawl",)),
    StageSpec(7, "image_filter", "pipeline.filter", ("image_filter",)),
    StageSpec(8, "image_dedup", "dedup.image", ("image_dedup",),
              lambda c: c.image_dedup.enabled),
    StageSpec(9, "decontaminate", "dedup.decontaminate", ("decontaminate",),
              lambda c: c.decontaminate.enabled and bool(c.decontaminate.eval_sets)),
    # Model-in-the-loop curation. The stage list names modules by string, so nothing of
    # pipeline/ imports training/ (the embed stage lives beside the model code).
    StageSpec(10, "embed", "training.embed", ("embed",), lambda c: bool(c.embed.checkpoint)),
    StageSpec(11, "clip_filter", "pipeline.filter", ("clip_filter",),
              lambda c: bool(c.embed.checkpoint) and bool(c.clip_filter.filters)),
    StageSpec(12, "semantic_dedup", "dedup.semantic", ("semantic_dedup",),
              lambda c: bool(c.embed.checkpoint) and c.semantic_dedup.enabled),
    StageSpec(13, "balance", "pipeline.balance", ("balance",), lambda c: c.balance.enabled),
    StageSpec(14, "shard", "pipeline.shard", ("shard",)),
]
STAGE_NAMES = [s.name for s in STAGES]


def get_spec(name: str) -> StageSpec:
    for s in STAGES:
        if s.name == name:
            return s
    raise StageError(f"unknown stage {name!r} (stages: {', '.join(STAGE_NAMES)})")


def enabled_stages(cfg: BuildConfig) -> list[StageSpec]:
    return [s for s in STAGES if s.enabled(cfg)]


def previous_stage(cfg: BuildConfig, spec: StageSpec) -> StageSpec | None:
    prev = None
    for s in enabled_stages(cfg):
        if s.name == spec.name:
            return prev
        prev = s
    raise StageError(f"stage {spec.name} is disabled in {cfg.path}")


def connect(cfg: BuildConfig, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """An in-process DuckDB with the build's memory limit and spill folder."""
    con = duckdb.connect(database)
    tmp = cfg.duckdb.temp_directory or str(cfg.run_dir / "_duckdb_tmp")
    Path(tmp).mkdir(parents=True, exist_ok=True)
    con.execute(f"SET memory_limit = '{cfg.duckdb.memory_limit}'")
    con.execute(f"SET temp_directory = '{tmp}'")
    if cfg.duckdb.threads:
        con.execute(f"SET threads = {int(cfg.duckdb.threads)}")
    con.execute("SET preserve_insertion_order = false")
    # witforge draws its own bars on stderr; DuckDB's goes to stdout and, outside a terminal,
    # writes a line per update (191 lines in one 10M-row run) between the stage summaries
    con.execute("SET enable_progress_bar = false")
    return con


def memory_limit_bytes(con: duckdb.DuckDBPyConnection) -> int | None:
    """The connection's memory limit in bytes, as DuckDB resolved it ('80%' too); None when
    it states none in bytes."""
    try:
        return parse_size(con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0])
    except ValueError:
        return None


@dataclass
class StageContext:
    cfg: BuildConfig
    spec: StageSpec
    out_dir: Path  # temporary folder, renamed into place on success
    input_path: Path | None  # previous stage's kept.parquet
    work_dir: Path  # persistent scratch kept across interruptions (crawl resumes from it)
    options: dict[str, Any]  # CLI flags such as retry_failed

    @property
    def kept_path(self) -> Path:
        return self.out_dir / "kept.parquet"

    @property
    def dropped_path(self) -> Path:
        return self.out_dir / "dropped.parquet"

    def connect(self) -> duckdb.DuckDBPyConnection:
        return connect(self.cfg)

    def write_empty_dropped(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute(
            f"COPY (SELECT * FROM (SELECT NULL::VARCHAR uid, NULL::VARCHAR stage, "
            f"NULL::VARCHAR reason, NULL::VARCHAR detail) WHERE false) "
            f"TO '{self.dropped_path}' (FORMAT parquet)"
        )


def stage_dir(cfg: BuildConfig, spec: StageSpec) -> Path:
    return cfg.run_dir / spec.folder


def kept_of(cfg: BuildConfig, name: str) -> Path:
    return stage_dir(cfg, get_spec(name)) / "kept.parquet"


def read_report(folder: Path) -> dict[str, Any] | None:
    if not (folder / "_SUCCESS").exists():
        return None
    return json.loads((folder / "report.json").read_text())


_OWN_PACKAGES = ("pipeline", "dedup", "training")


def _imported_modules(path: Path) -> set[str]:
    """The witforge modules a source file imports (``from pipeline import stage`` may name
    a module or a function: both candidates are returned, the caller keeps what exists)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n.split(".")[0] in _OWN_PACKAGES}


def code_files(module: str) -> list[Path]:
    """Every file whose change can change a stage's output: its module, the witforge modules
    it imports (transitively), and the .sql files next to them that they name."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            continue
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        seen[name] = Path(spec.origin)
        todo.extend(_imported_modules(seen[name]))
    files = set(seen.values())
    for path in list(files):
        text = path.read_text(encoding="utf-8")
        files.update(q for q in (path.parent / "sql").rglob("*.sql") if q.name in text)
    return sorted(files)


_ROOT = Path(__file__).resolve().parents[1]


def _code_hashes(module: str) -> tuple[str, dict[str, str]]:
    """(one hash of all the stage's code files, each file's own hash by its repo path)."""
    h = hashlib.sha256()
    per_file = {}
    for path in code_files(module):
        data = path.read_bytes()
        h.update(path.name.encode() + b"\0" + data)
        name = str(path.relative_to(_ROOT)) if path.is_relative_to(_ROOT) else path.name
        per_file[name] = hashlib.sha256(data).hexdigest()[:16]
    return h.hexdigest()[:16], per_file


def stage_inputs(cfg: BuildConfig, spec: StageSpec, upstream: str) -> dict[str, Any]:
    """Everything a stage's output depends on: the config sections it reads, the upstream
    stage's fingerprint, its code, and what its module adds (input files, filter files).
    Recorded in report.json, so `witforge status` can say what changed."""
    settings = {}
    for key in spec.settings:
        value = getattr(cfg, key)
        if isinstance(value, list):
            settings[key] = [vars(v) for v in value]
        else:
            skip = RUN_ONLY_SETTINGS.get(key, ())
            settings[key] = {k: v for k, v in vars(value).items() if k not in skip}
    extra = {}
    mod = importlib.import_module(spec.module)
    if hasattr(mod, "fingerprint_inputs"):
        extra = mod.fingerprint_inputs(cfg, spec)
    code, code_files_ = _code_hashes(spec.module)
    inputs = {"stage": spec.name, "settings": settings, "upstream": upstream, "code": code,
              "extra": extra, "code_files": code_files_}
    return json.loads(json.dumps(inputs, default=str))  # as report.json will hold it


def fingerprint_of(inputs: dict[str, Any]) -> str:
    # code_files only explains a change; the one code hash already covers it
    blob = json.dumps({k: v for k, v in inputs.items() if k != "code_files"},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _count(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    return con.execute(f"SELECT count(*) FROM read_parquet('{path}')").fetchall()[0][0]


def run_stage(cfg: BuildConfig, name: str, force: bool = False,
              options: dict[str, Any] | None = None,
              log: Callable[[str], None] = print,
              explain: Explain | None = None) -> dict[str, Any]:
    """Run one stage (its upstream must be done); skip it when inputs and settings match.
    ``explain`` (``pipeline.status.changes``) words why a finished stage runs again; it is
    passed in, not imported, so the wording is not part of every stage's code fingerprint."""
    spec = get_spec(name)
    if not spec.enabled(cfg):
        raise StageError(f"stage {name} is disabled in {cfg.path}")
    prev = previous_stage(cfg, spec)
    upstream_fp = ""
    input_path = None
    if prev is not None:
        prev_report = read_report(stage_dir(cfg, prev))
        if prev_report is None:
            raise StageError(
                f"stage {name} needs stage {prev.name} first: run `witforge {prev.name} "
                f"--build {cfg.path}` (or `witforge run`)"
            )
        upstream_fp = prev_report["fingerprint"]
        input_path = stage_dir(cfg, prev) / "kept.parquet"
    inputs = stage_inputs(cfg, spec, upstream_fp)
    fp = fingerprint_of(inputs)
    final = stage_dir(cfg, spec)
    existing = read_report(final)
    if existing and existing.get("fingerprint") == fp and not force and not (options or {}).get(
        "retry_failed"
    ):
        log(f"[{spec.folder}] up to date, skipped ({existing['kept']:,} kept)")
        existing["skipped"] = True
        return existing
    if existing and existing.get("fingerprint") != fp and explain is not None:
        log(f"[{spec.folder}] runs again: " + "; ".join(explain(existing, inputs, prev)))

    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*cfg.run_dir.glob(f".{spec.folder}.tmp-*"),
                  *cfg.run_dir.glob(f".{spec.folder}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = cfg.run_dir / f".{spec.folder}.tmp-{os.getpid()}"
    tmp.mkdir()
    work = cfg.run_dir / f"{spec.folder}.work"
    ctx = StageContext(cfg, spec, tmp, input_path, work, dict(options or {}))
    started, cpu0 = time.time(), _cpu_times()
    try:
        mod = importlib.import_module(spec.module)
        extra = mod.run(ctx) or {}
        seconds, cpu = time.time() - started, _cpu_since(cpu0)
        report = _finish_report(ctx, extra, seconds, fp, prev)
        report.update(cpu)
        report["inputs"] = inputs
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (tmp / "_SUCCESS").write_text("")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            free = shutil.disk_usage(cfg.run_dir).free / 2**20
            raise StageError(
                f"stage {name}: no space left on the disk holding {cfg.run_dir} ({free:,.1f} MB "
                "free now); nothing half-written was kept: free some space and rerun") from e
        raise
    if final.exists():
        old = cfg.run_dir / f".{spec.folder}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    log(_summary_line(spec, report))
    return report


def _cpu_times() -> tuple[float, float]:
    """(this process's CPU seconds, its waited-for children's): user + system."""
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time(), c.ru_utime + c.ru_stime


def _cpu_since(start: tuple[float, float]) -> dict[str, Any]:
    """CPU seconds a stage used, for `witforge plan`: the process (every thread, so a demo
    web served in-process counts too) plus the children it waited for (img2dataset's worker
    and its pool, the guard proxy, pHash workers), and the cores it could run on."""
    own, children = (b - a for a, b in zip(start, _cpu_times(), strict=True))
    return {"cpu_seconds": round(own + children, 3),
            "cpu_seconds_children": round(children, 3), "cores": len(os.sched_getaffinity(0))}


def disk_full(e: BaseException) -> bool:
    """An OSError ENOSPC, or DuckDB's IO error wrapping one."""
    return (getattr(e, "errno", None) == errno.ENOSPC
            or (isinstance(e, (OSError, duckdb.IOException))
                and "No space left on device" in str(e)))


def _finish_report(ctx: StageContext, extra: dict[str, Any], seconds: float, fp: str,
                   prev: StageSpec | None) -> dict[str, Any]:
    con = ctx.connect()
    if not ctx.kept_path.exists() or not ctx.dropped_path.exists():
        raise StageError(f"stage {ctx.spec.name} wrote no kept.parquet/dropped.parquet")
    kept = _count(con, ctx.kept_path)
    dropped = _count(con, ctx.dropped_path)
    by_reason = dict(con.execute(
        f"SELECT reason, count(*) FROM read_parquet('{ctx.dropped_path}') "
        "GROUP BY reason ORDER BY 2 DESC").fetchall())
    rows_in = extra.pop("rows_in", None)
    if rows_in is None:
        rows_in = _count(con, ctx.input_path) if ctx.input_path else kept + dropped
    report = {
        "stage": ctx.spec.name, "folder": ctx.spec.folder,
        "input": str(ctx.input_path) if ctx.input_path else None,
        "upstream": prev.name if prev else None,
        "rows_in": rows_in, "kept": kept, "dropped": dropped,
        "dropped_by_reason": by_reason, "seconds": round(seconds, 3),
        "rows_per_s": round(rows_in / seconds, 1) if seconds > 0 else None,
        "fingerprint": fp,
    }
    report.update(extra)
    return report


def _summary_line(spec: StageSpec, r: dict[str, Any]) -> str:
    reasons = ", ".join(f"{k}={v:,}" for k, v in r["dropped_by_reason"].items())
    return (f"[{spec.folder}] {r['rows_in']:,} in → {r['kept']:,} kept, {r['dropped']:,} dropped"
            f"{' (' + reasons + ')' if reasons else ''} in {r['seconds']:.1f}s")
