"""One crawl attempt: a fixed url list downloaded by img2dataset into its own folder.

Layout of ``runs/<build>/06_crawl.work/attempt_NNN/``::

    urls.parquet     uid, url, caption — sorted by uid, written once, never changed
    download.json    img2dataset.download keyword arguments
    images/          img2dataset's output: NNNNN.tar, NNNNN.parquet, NNNNN_stats.json
    hashes.parquet   attempt, key, tar, sha256, bytes of each stored image (when done)
    crawl.log        img2dataset's own output
    worker.pid       the img2dataset worker's pid (its process group) of the latest run
    guard.jsonl      the guard proxy's refusals and summaries; guard.log its stderr
    confirmed.txt    the shards the stage saw finished while it and its guard were alive
    _DONE            every shard finished and hashed

img2dataset resumes whole shards (``incremental_mode``): a shard counts as done when its
``_stats.json`` exists. Before resuming, every shard that is not provably complete, or that
the stage did not see finished while it and its guard were alive, is removed and downloaded
again (pipeline/crawl_resume.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.config import BuildConfig
from pipeline.crawl_resume import (
    clean_partial_shards,
    confirm_shards,
    confirmed_shards,
    shard_name,
)
from pipeline.guard import spark_hook
from pipeline.guard.proxy import GuardProxy, crawl_timeout, guarded_env
from pipeline.progress import progress
from pipeline.robots import crawl_delays
from pipeline.stage import StageError

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Attempt:
    number: int
    folder: Path

    @property
    def urls(self) -> Path:
        return self.folder / "urls.parquet"

    @property
    def images(self) -> Path:
        return self.folder / "images"

    @property
    def hashes(self) -> Path:
        return self.folder / "hashes.parquet"

    @property
    def log(self) -> Path:
        return self.folder / "crawl.log"

    @property
    def done(self) -> bool:
        return (self.folder / "_DONE").exists()

    def rows(self) -> int:
        return pq.ParquetFile(self.urls).metadata.num_rows

    def shard_count(self, per_shard: int) -> int:
        return math.ceil(self.rows() / per_shard)

    def stats_files(self) -> list[Path]:
        return sorted(self.images.glob("*_stats.json")) if self.images.exists() else []

    def counts(self) -> tuple[int, int]:
        """(samples, successes) over the finished shards."""
        n = ok = 0
        for p in self.stats_files():
            s = json.loads(p.read_text())
            n, ok = n + s["count"], ok + s["successes"]
        return n, ok

    def result_files(self) -> list[Path]:
        return [p.with_name(p.name.replace("_stats.json", ".parquet")) for p in self.stats_files()]


def download_kwargs(cfg: BuildConfig, attempt: Attempt) -> dict[str, Any]:
    """img2dataset.download arguments for an attempt; bench_crawl reuses them verbatim."""
    c = cfg.crawl
    return {
        "url_list": str(attempt.urls),
        "input_format": "parquet",
        "url_col": "url",
        "caption_col": "caption",
        "save_additional_columns": ["uid"],
        "output_folder": str(attempt.images),
        "output_format": "webdataset",
        "image_size": c.image_size,
        "resize_mode": c.resize_mode,
        "resize_only_if_bigger": c.resize_only_if_bigger,
        "encode_format": c.encode_format,
        "encode_quality": c.encode_quality,
        "min_image_size": c.min_image_size,
        "max_image_area": c.max_image_area,
        "max_aspect_ratio": c.max_aspect_ratio,
        "timeout": crawl_timeout(c),  # behind the guard: longer than its deadline (guard/)
        "retries": c.retries,
        "processes_count": c.processes_count,
        "thread_count": c.thread_count,
        "number_sample_per_shard": c.number_sample_per_shard,
        "user_agent_token": c.user_agent_token or None,
        # An empty list means "check no directive" in img2dataset; None would mean its defaults.
        "disallowed_header_directives": list(c.disallowed_header_directives),
        "distributor": c.distributor,
        "extract_exif": False,
        "compute_hash": "sha256",  # of the bytes as downloaded, kept as source_sha256
        "incremental_mode": "incremental",
        "enable_wandb": False,
    }


def worker_env(cfg: BuildConfig) -> dict[str, str]:
    """Environment of the img2dataset process (the safe-crawl guard adds its proxy here)."""
    env = dict(os.environ)
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    env["WANDB_MODE"] = "disabled"
    env["PYSPARK_PYTHON"] = sys.executable
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def check_free_space(cfg: BuildConfig, folder: Path) -> None:
    """Refuse to go on below ``crawl.min_free_mb`` free on the crawl's disk.

    On a full disk img2dataset's writers fail sample by sample and its pool can stall without
    exiting; stopping before that leaves finished shards to resume from (a half-written shard
    fails ``_shard_ok`` and is downloaded again), and says what happened."""
    floor = cfg.crawl.min_free_mb
    if floor <= 0:
        return
    free = shutil.disk_usage(folder).free
    if free < floor * 2**20:
        raise StageError(
            f"crawl: {free / 2**20:,.1f} MB free on the disk holding {folder}, under "
            f"crawl.min_free_mb ({floor:g} MB) in {cfg.path}; the crawl stopped before the disk "
            "filled. Free some space (or point runs_dir at a larger disk) and rerun: it "
            "resumes from its finished shards")


class StallWatch:
    """Stops a crawl whose img2dataset output stops growing for ``crawl.stall_minutes``.

    When one of img2dataset's download processes dies mid-shard (the OOM killer, a crash in
    a decoder), ``multiprocessing.Pool.imap_unordered`` waits forever for its result: the
    other processes finish their shards and the crawl hangs (seen here: a SIGKILL to the
    pool's processes, and the stage was still waiting 90 s later)."""

    def __init__(self, cfg: BuildConfig, attempt: Attempt) -> None:
        self.cfg, self.attempt = cfg, attempt
        self.limit = cfg.crawl.stall_minutes * 60
        self.every = min(5.0, self.limit / 4)
        self.seen: tuple[int, int] | None = None
        self.since = self.next = time.monotonic()

    def _activity(self) -> tuple[int, int]:
        files = size = 0
        for root, _, names in os.walk(self.attempt.images):
            for name in names:
                try:
                    size += os.stat(os.path.join(root, name)).st_size
                    files += 1
                except OSError:
                    pass  # img2dataset renames and removes its temp files
        return files, size

    def check(self) -> None:
        now = time.monotonic()
        if self.limit <= 0 or now < self.next:
            return
        self.next = now + self.every
        activity = self._activity()
        if activity != self.seen:
            self.seen, self.since = activity, now
        elif now - self.since >= self.limit:
            raise StageError(
                f"crawl: img2dataset wrote nothing to {self.attempt.images} for "
                f"{self.limit / 60:g} min (crawl.stall_minutes in {self.cfg.path}). One of its "
                "download processes has probably died (the OOM killer?) and its pool then "
                f"waits forever; see {self.attempt.log}. Rerun: the crawl resumes from its "
                "finished shards")


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the worker has exited, leaving it unreaped: while its zombie holds the pid,
    the group id cannot go to another process, so :func:`_stop_group` is safe."""
    if proc.returncode is not None:
        return True
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _stop_group(proc: subprocess.Popen) -> None:
    """Kill the worker's group: img2dataset's pool too, which a worker killed on its own (the
    OOM killer) leaves behind, still writing shards."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _check_guard(guard: GuardProxy | None, attempt: Attempt) -> None:
    code = guard.exit_code() if guard is not None else None
    if code is None:
        return
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    raise StageError(
        f"crawl: the guard proxy (pid {guard.pid}) {how} while img2dataset was downloading "
        f"{attempt.folder}; shards it was serving are not kept. See its log "
        f"{attempt.folder / 'guard.log'} (refusals in {attempt.folder / 'guard.jsonl'}). "
        "Rerun: the crawl resumes from the shards finished before")


def _progress(stats_files: list[Path], bar: tqdm, seen: set[str],
              counts: dict[str, int]) -> None:
    for stats in stats_files:
        if stats.name in seen:
            continue
        try:
            s = json.loads(stats.read_text())
        except (OSError, ValueError):
            continue  # being written; read it next time
        seen.add(stats.name)
        counts["ok"] += s["successes"]
        counts["failed"] += s["count"] - s["successes"]
        bar.set_postfix(ok=counts["ok"], failed=counts["failed"], refresh=False)
        bar.update(s["count"])


def _run_worker(cfg: BuildConfig, attempt: Attempt, job: Path, bar: tqdm) -> int:
    """One img2dataset run behind the guard; its exit status."""
    delays = crawl_delays(cfg)  # robots.txt Crawl-delay per host, for the guard
    # Safe crawl (issue 5): with crawl.guard, every request of the worker goes through a
    # guarding proxy on loopback (http_proxy/https_proxy in its env); see pipeline/guard.
    with guarded_env(cfg.crawl, worker_env(cfg), attempt.folder / "guard.jsonl",
                     domain_intervals=delays, log_path=attempt.folder / "guard.log") as (
            env, guard), open(attempt.log, "ab") as log:
        if guard is not None and cfg.crawl.distributor == "pyspark":
            env.update(executor_guard_env(attempt, guard))
        cmd = [sys.executable, "-m", "pipeline.crawl_worker", str(job)]
        if guard is not None:
            cmd += ["--guard-pid", str(guard.pid)]
        # stdin: a pipe the worker's watchdog reads; it closes when this process dies.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.PIPE, env=env, cwd=attempt.folder,
                                start_new_session=True)
        (attempt.folder / "worker.pid").write_text(str(proc.pid))
        watch = StallWatch(cfg, attempt)
        counts = {"ok": 0, "failed": 0}
        seen: set[str] = set()
        confirmed = confirmed_shards(attempt)  # resumed shards: recorded already
        try:
            while True:
                running = not _exited(proc)
                finished = attempt.stats_files()
                # Listed first, then the guard checked: shards confirmed below finished
                # before a moment at which the guard, and this process, were alive.
                _check_guard(guard, attempt)
                names = {shard_name(p) for p in finished}
                confirm_shards(attempt, names - confirmed)
                confirmed |= names
                _progress(finished, bar, seen, counts)
                if not running:
                    break
                check_free_space(cfg, attempt.folder)
                watch.check()
                time.sleep(0.25)
        finally:
            _stop_group(proc)
            proc.stdin.close()
    if guard is not None and cfg.crawl.distributor == "pyspark":
        wait_for_executor_guards(attempt)
    return proc.returncode


def executor_guard_env(attempt: Attempt, guard: GuardProxy) -> dict[str, str]:
    """What a Spark executor needs to start its own guard with the stage's settings
    (pipeline/guard/spark_hook.py); local-mode executors see WITFORGE_GUARD_URL and use the
    stage's guard instead."""
    settings = attempt.folder / "guard-settings.json"
    settings.write_text(json.dumps(asdict(guard.settings)), encoding="utf-8")
    return {spark_hook.SETTINGS_ENV: str(settings), spark_hook.EVENTS_ENV: str(attempt.folder),
            spark_hook.URL_ENV: guard.url}


def wait_for_executor_guards(attempt: Attempt, timeout: float = 20.0) -> None:
    """Executors' guards write their summary line when their executor ends, a moment after
    the Spark job: wait (a bounded while) so that the report counts them."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(guard_summary(p) is not None for p in attempt.folder.glob("guard-*.jsonl")):
            return
        time.sleep(0.25)


def guard_summary(path: Path) -> dict[str, Any] | None:
    """The summary line of a guard's event log (None while that guard still runs)."""
    try:
        lines = path.read_bytes().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if '"summary"' in line:
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def run_attempt(cfg: BuildConfig, attempt: Attempt) -> None:
    """Download an attempt's missing shards in a worker process, with a progress bar."""
    kwargs = download_kwargs(cfg, attempt)
    job = attempt.folder / "download.json"
    job.write_text(json.dumps(kwargs, indent=2))
    per_shard = cfg.crawl.number_sample_per_shard
    for _ in range(2):  # a second pass retries shards img2dataset gave up on
        with progress(total=attempt.rows(), desc=f"crawl attempt {attempt.number}",
                      unit="img", mininterval=1.0, dynamic_ncols=True) as bar:
            code = _run_worker(cfg, attempt, job, bar)
        if code != 0:
            raise StageError(f"img2dataset failed (exit {code}) in {attempt.folder}; "
                             f"last lines of {attempt.log}:\n{_tail(attempt.log)}")
        if len(attempt.stats_files()) >= attempt.shard_count(per_shard):
            return
        clean_partial_shards(attempt)
    missing = attempt.shard_count(per_shard) - len(attempt.stats_files())
    raise StageError(f"img2dataset left {missing} shard(s) of {attempt.folder} unfinished; "
                     f"rerun to retry them (see {attempt.log}):\n{_tail(attempt.log)}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


_HASH_SCHEMA = pa.schema([("attempt", pa.int32()), ("key", pa.string()), ("tar", pa.string()),
                          ("sha256", pa.string()), ("bytes", pa.int64())])


def _hash_tar(tar_path: Path, suffix: str, number: int, rel: str) -> pa.Table:
    cols: dict[str, list[Any]] = {"attempt": [], "key": [], "tar": [], "sha256": [], "bytes": []}
    with tarfile.open(tar_path) as t:
        for m in t:
            if not m.name.endswith(suffix):
                continue
            data = t.extractfile(m).read()
            cols["attempt"].append(number)
            cols["key"].append(m.name[: -len(suffix)])
            cols["tar"].append(rel)
            cols["sha256"].append(hashlib.sha256(data).hexdigest())
            cols["bytes"].append(len(data))
    return pa.table(cols, schema=_HASH_SCHEMA)


def hash_images(attempt: Attempt, encode_format: str, run_dir: Path, threads: int = 2) -> None:
    """sha256 and size of each stored image, read back from the tars (what later stages see).

    Image bytes are read one member at a time; threads overlap the tar reads and hashlib
    (which releases the GIL)."""
    tars = [s.with_name(s.name.replace("_stats.json", ".tar")) for s in attempt.stats_files()]
    tmp = attempt.hashes.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, _HASH_SCHEMA) as out, ThreadPoolExecutor(threads) as pool:
        jobs = [pool.submit(_hash_tar, t, "." + encode_format, attempt.number,
                            os.path.relpath(t, run_dir)) for t in tars]
        for job in jobs:
            out.write_table(job.result())
    tmp.replace(attempt.hashes)
    (attempt.folder / "_DONE").write_text("")
