"""Crawl: download the images with img2dataset and join the results back to uid.

img2dataset (its own downloader, resizer and webdataset writer) runs in a worker process
(``pipeline.crawl_worker``) over a uid-sorted url list. Its output — tars, per-shard parquet
and stats — stays in the persistent folder ``runs/<build>/06_crawl.work/attempt_NNN/images/``
because later stages (image dedup, shard) read the images from those tars.

Attempts make reruns cheap and exact:

* attempt 0 downloads every input row; a killed run resumes it shard by shard (half-written
  shards are redone), so the final table equals that of an uninterrupted run;
* rows that appear upstream later (a changed filter) get a new attempt with just those rows,
  and with ``--retry-failed`` that attempt also holds the uids whose latest result failed;
* changing an image setting (size, format, filters...) starts again from scratch.

Each uid takes its latest attempt. kept.parquet has every input column plus status,
error_message, width, height, original_width, original_height, sha256 (of the stored bytes),
source_sha256 (of the bytes as downloaded), bytes, tar (path relative to the run folder
``runs/<build>/``) and key (the member name without extension: ``<key>.jpg`` in that tar).
dropped.parquet has a short reason from :func:`classify_error` and img2dataset's message.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import BuildConfig
from pipeline.crawl_attempt import (
    Attempt,
    check_free_space,
    guard_summary,
    hash_images,
    run_attempt,
)
from pipeline.crawl_resume import clean_partial_shards, stop_stale_worker
from pipeline.stage import StageContext, StageError

SQL = Path(__file__).parent / "sql" / "crawl_merge.sql"

# img2dataset error message (regex, case-insensitive) -> reason; the first match wins, so
# specific patterns go before general ones. Messages come from urllib (HTTPError, URLError,
# socket errors), img2dataset's downloader (X-Robots-Tag, hash) and its resizer.
ERROR_REASONS: list[tuple[str, str]] = [
    # The safe-crawl guard (pipeline/guard) names its refusals in the reason phrase:
    # "HTTP Error 403: witforge-guard blocked_address http://...". urllib itself refuses
    # redirects to file:// and other schemes.
    (r"witforge-guard blocked_address", "blocked_address"),
    (r"witforge-guard blocked_scheme|Redirection to url '.*' is not allowed", "blocked_scheme"),
    (r"witforge-guard deadline_exceeded", "deadline_exceeded"),
    (r"witforge-guard body_too_large", "body_too_large"),
    (r"witforge-guard domain_busy", "domain_busy"),
    (r"witforge-guard dns_error", "dns_error"),
    (r"witforge-guard (connect_error|upstream_error|bad_response)", "connection_error"),
    (r"X-Robots-Tag", "disallowed_header"),
    (r"redirect error that would lead to an infinite loop", "redirect_loop"),
    (r"^HTTP Error 404\b", "http_404"),
    (r"^HTTP Error 410\b", "http_410"),
    (r"^HTTP Error 403\b", "http_403"),
    (r"^HTTP Error 429\b", "http_429"),
    (r"^HTTP Error 4\d\d\b", "http_4xx"),
    (r"^HTTP Error 5\d\d\b", "http_5xx"),
    (r"^HTTP Error \d+", "http_other"),
    (r"timed out|timeout", "timeout"),
    (r"IncompleteRead|Connection broken", "truncated"),
    (r"Name or service not known|Temporary failure in name resolution|"
     r"No address associated with hostname|getaddrinfo failed|nodename nor servname", "dns_error"),
    (r"CERTIFICATE_VERIFY_FAILED|\[SSL", "ssl_error"),
    (r"unknown url type|no host given|control characters|Invalid URL|nonnumeric port",
     "bad_url"),
    (r"Connection refused|Connection reset|Remote end closed|Broken pipe|Network is "
     r"unreachable|No route to host|Connection aborted|BadStatusLine|urlopen error",
     "connection_error"),
    (r"^Image decoding error$", "decode_error"),
    (r"^image too small$", "too_small"),
    (r"^image area too large$", "too_large"),
    (r"^aspect ratio too large$", "bad_aspect_ratio"),
    (r"^hash mismatch$", "hash_mismatch"),
]


def classify_error(message: str | None) -> str:
    """A short reason for an img2dataset error message ('other' when nothing matches)."""
    text = (message or "").strip()
    for pattern, reason in ERROR_REASONS:  # re caches compiled patterns; only distinct
        if re.search(pattern, text, re.IGNORECASE):  # messages are classified
            return reason
    return "other"


# Settings that change what ends up in the tars; any change means downloading again.
_IMAGE_SETTINGS = ("image_size", "resize_mode", "resize_only_if_bigger", "encode_format",
                   "encode_quality", "min_image_size", "max_image_area", "max_aspect_ratio",
                   "user_agent_token", "disallowed_header_directives", "number_sample_per_shard")


def _settings_key(cfg: BuildConfig) -> str:
    values = {k: getattr(cfg.crawl, k) for k in _IMAGE_SETTINGS}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def attempts(work: Path) -> list[Attempt]:
    found = []
    for p in sorted(work.glob("attempt_*")):
        if p.is_dir() and (p / "urls.parquet").exists():
            found.append(Attempt(int(p.name.split("_")[1]), p))
    return found


def _prepare_work(cfg: BuildConfig, work: Path) -> bool:
    """Start from scratch when the image settings changed since the tars were written;
    True if earlier downloads were discarded."""
    state = work / "settings.json"
    key = _settings_key(cfg)
    discarded = False
    if work.exists() and (not state.exists() or json.loads(state.read_text())["key"] != key):
        discarded = any(work.glob("attempt_*"))
        if discarded:
            print(f"crawl: image settings changed since {work} was written; downloading "
                  "everything again", file=sys.stderr)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not state.exists():
        values = {k: getattr(cfg.crawl, k) for k in _IMAGE_SETTINGS}
        state.write_text(json.dumps({"key": key, "settings": values}, indent=2, default=str))
    return discarded


def _new_attempt(con: Any, work: Path, number: int, select_sql: str) -> Attempt | None:
    """Write a uid-sorted url list for the rows of ``select_sql``; None if there are none."""
    n = con.execute(f"SELECT count(*) FROM ({select_sql})").fetchall()[0][0]
    if n == 0:
        return None
    folder = work / f"attempt_{number:03d}"
    if folder.exists():  # a url list that never got written completely
        shutil.rmtree(folder)
    folder.mkdir()
    tmp = folder / "urls.parquet.tmp"
    con.execute(f"COPY (SELECT uid, url, caption FROM ({select_sql}) ORDER BY uid) "
                f"TO '{tmp}' (FORMAT parquet)")
    tmp.rename(folder / "urls.parquet")
    return Attempt(number, folder)


def _results_sql(done: list[Attempt]) -> str:
    parts = []
    for a in done:
        files = ", ".join(f"'{p}'" for p in a.result_files())
        parts.append(
            f"SELECT {a.number} AS attempt, uid, key, status, error_message, width, height, "
            f"original_width, original_height, sha256 AS source_sha256 "
            f"FROM read_parquet([{files}])")
    if not parts:  # no rows were ever attempted (empty input)
        return ("SELECT 0 AS attempt, NULL::VARCHAR uid, NULL::VARCHAR key, NULL::VARCHAR "
                "status, NULL::VARCHAR error_message, NULL::INT width, NULL::INT height, "
                "NULL::INT original_width, NULL::INT original_height, "
                "NULL::VARCHAR source_sha256 WHERE false")
    return " UNION ALL ".join(parts)


def _download(ctx: StageContext, con: Any) -> dict[str, Any]:
    cfg, work = ctx.cfg, ctx.work_dir
    discarded = _prepare_work(cfg, work)
    src = f"read_parquet('{ctx.input_path}')"
    started = time.time()
    fig = {"samples": 0, "images": 0, "resumed_shards": 0, "worker_seconds": 0.0}

    def finish(a: Attempt) -> None:
        stop_stale_worker(a)
        clean_partial_shards(a)
        fig["resumed_shards"] += len(a.stats_files())
        before = a.counts()
        if len(a.stats_files()) < a.shard_count(cfg.crawl.number_sample_per_shard):
            t = time.time()
            run_attempt(cfg, a)
            fig["worker_seconds"] += time.time() - t
        after = a.counts()
        fig["samples"] += after[0] - before[0]
        fig["images"] += after[1] - before[1]
        hash_images(a, cfg.crawl.encode_format, cfg.run_dir, cfg.crawl.processes_count)

    for a in attempts(work):  # an attempt interrupted last time is finished first
        if not a.done:
            finish(a)
    # One new attempt: rows never tried (new upstream), plus with --retry-failed the rows
    # whose latest result failed. One img2dataset start-up for both.
    done = attempts(work)
    todo = src
    if done:
        tried = ", ".join(f"'{a.urls}'" for a in done)
        todo = f"SELECT * FROM {src} ANTI JOIN read_parquet([{tried}]) t USING (uid)"
        if ctx.options.get("retry_failed"):
            latest = (f"SELECT uid, status FROM ({_results_sql(done)}) QUALIFY row_number() "
                      "OVER (PARTITION BY uid ORDER BY attempt DESC) = 1")
            todo += (f" UNION ALL SELECT i.* FROM {src} i JOIN ({latest}) p USING (uid) "
                     "WHERE p.status <> 'success'")
    a = _new_attempt(con, work, len(done), todo)
    if a is not None:
        finish(a)
    secs = time.time() - started
    return {"downloaded_samples": fig["samples"], "downloaded_images": fig["images"],
            "download_seconds": round(secs, 3), "resumed_shards": fig["resumed_shards"],
            "worker_seconds": round(fig["worker_seconds"], 3),  # img2dataset's process alone
            "discarded_old_downloads": discarded,
            "samples_per_s": round(fig["samples"] / secs, 1) if fig["samples"] else None,
            "images_per_s": round(fig["images"] / secs, 1) if fig["samples"] else None}


def _check_distributor(cfg: BuildConfig) -> None:
    """Fail before any download when the pyspark distributor cannot start: Spark needs
    pyspark and a Java runtime (17+ for pyspark 4), and says so only deep in a worker log."""
    if cfg.crawl.distributor != "pyspark":
        return
    if importlib.util.find_spec("pyspark") is None:
        raise StageError(f"{cfg.path}: crawl.distributor: pyspark needs pyspark "
                         "(pip install pyspark) in this Python")
    java_home = os.environ.get("JAVA_HOME")
    if not shutil.which("java") and not (java_home and Path(java_home, "bin", "java").exists()):
        raise StageError(f"{cfg.path}: crawl.distributor: pyspark needs a Java runtime (17+): "
                         "no java on PATH and JAVA_HOME unset")


def run(ctx: StageContext) -> dict[str, Any]:
    if ctx.input_path is None:
        raise StageError("crawl needs an upstream stage (ingest at least)")
    _check_distributor(ctx.cfg)
    check_free_space(ctx.cfg, ctx.cfg.run_dir)
    con = ctx.connect()
    figures = _download(ctx, con)
    done = attempts(ctx.work_dir)
    messages = [r[0] for r in con.execute(
        f"SELECT DISTINCT error_message FROM ({_results_sql(done)}) "
        "WHERE error_message IS NOT NULL").fetchall()]
    con.execute("CREATE OR REPLACE TEMP TABLE crawl_reasons (error_message VARCHAR, "
                "reason VARCHAR)")
    if messages:
        con.executemany("INSERT INTO crawl_reasons VALUES (?, ?)",
                        [(m, classify_error(m)) for m in messages])
    own = {"status", "error_message", "width", "height", "original_width", "original_height",
           "sha256", "source_sha256", "bytes", "tar", "key", "attempt"}
    cols = [r[0] for r in con.execute(
        f"DESCRIBE SELECT * FROM read_parquet('{ctx.input_path}')").fetchall()]
    clash = [c for c in cols if c in own]
    input_cols = "i.*" + (f" EXCLUDE ({', '.join(clash)})" if clash else "")
    sql = SQL.read_text().format(
        results=_results_sql(done), hashes=_hashes_sql(done), input=ctx.input_path,
        input_cols=input_cols, reasons="crawl_reasons")
    con.execute(sql)
    no_result, no_image, repeated = con.execute("SELECT * FROM crawl_problems").fetchall()[0]
    if repeated:
        raise StageError(f"{ctx.input_path}: {repeated} repeated uids; the crawl needs one row "
                         "per uid (ingest drops exact repeats)")
    if no_result or no_image:
        raise StageError(f"crawl results in {ctx.work_dir} are incomplete: {no_result} rows "
                         f"without a result, {no_image} successes without an image in the tar")
    con.execute(f"COPY (SELECT * FROM crawl_kept) TO '{ctx.kept_path}' (FORMAT parquet)")
    con.execute(f"COPY (SELECT * FROM crawl_dropped) TO '{ctx.dropped_path}' (FORMAT parquet)")
    rows, kept = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE status = 'success') FROM crawl_joined"
    ).fetchall()[0]
    figures.update({
        "success_rate": round(kept / rows, 4) if rows else None,
        "attempts": len(done), "images_dir": str(ctx.work_dir),
        "tar_paths_relative_to": str(ctx.cfg.run_dir),
        "guards": guard_summaries(done),
    })
    return figures


def guard_summaries(done: list[Attempt]) -> list[dict[str, Any]]:
    """Every guard of every attempt, with its counts: the stage's own (guard.jsonl) and, on a
    Spark cluster, one per executor (guard-<host>-<pid>.jsonl; pipeline/guard/spark_hook.py)."""
    out = []
    for a in done:
        for path in sorted(a.folder.glob("guard*.jsonl")):
            s = guard_summary(path)
            row: dict[str, Any] = {"attempt": a.number, "log": path.name}
            if s is None:
                row["summary_missing"] = True  # killed before it could write one
            else:
                row.update(s["summary"], cpu_seconds=s.get("cpu_seconds"))
            out.append(row)
    return out


def _hashes_sql(done: list[Attempt]) -> str:
    if not done:
        return ("SELECT 0::INT attempt, ''::VARCHAR key, ''::VARCHAR tar, ''::VARCHAR sha256, "
                "0::BIGINT bytes WHERE false")
    return "SELECT * FROM read_parquet([" + ", ".join(f"'{a.hashes}'" for a in done) + "])"


def image_tar(cfg: BuildConfig, tar: str) -> Path:
    """The absolute path of a kept row's ``tar`` (stored relative to the run folder)."""
    return cfg.run_dir / tar
