"""One img2dataset download in its own process: `python -m pipeline.crawl_worker JOB.json
[--guard-pid PID]`.

JOB.json holds the keyword arguments of ``img2dataset.download``. The crawl stage starts
this module in a new session (its own process group) so that img2dataset's spawned pool
and logger processes can be stopped together, and so that a 5 s import and any crash in a
download process stay out of the stage's process.

A watchdog thread kills the whole group (SIGKILL) the moment the stage process or the guard
proxy dies: otherwise orphaned pool workers would keep writing shards while a rerun resumes
the same folder, and every request they still make fails at once (the guard, and in
``make demo`` the demo web, died with the stage), so a shard finished in that window holds
connection errors that are not the web's. The stage's end of our stdin pipe closes when the
stage dies, however it dies; the guard is watched through a pidfd. Both wake the watchdog at
once (no polling delay); the parent-pid check every 0.5 s is a fallback for a worker started
without the pipe. The stage also refuses, on resume, any shard it did not see finish while it
and its guard were alive (pipeline/crawl_attempt.py), so what this watchdog cannot prevent in
its last microseconds is never kept.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import stat
import sys
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _stop_group() -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)


def _watch(parent: int, guard_pid: int | None) -> None:
    # Only a session leader may kill its group: started any other way (by hand, in a
    # debugger), the group would include the caller's shell.
    if os.getsid(0) != os.getpid():
        return
    poller = select.poll()
    pipe = stat.S_ISFIFO(os.fstat(0).st_mode)
    if pipe:
        poller.register(0, select.POLLIN)
    guard_fd = None
    if guard_pid:
        try:
            guard_fd = os.pidfd_open(guard_pid)
        except ProcessLookupError:  # the guard is already gone
            _stop_group()
        poller.register(guard_fd, select.POLLIN)
    while True:
        for fd, _ in poller.poll(500):
            if fd == guard_fd or not os.read(0, 4096):  # the guard exited / stdin closed
                _stop_group()
        if os.getppid() != parent:
            _stop_group()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.crawl_worker")
    p.add_argument("job", help="JSON file with img2dataset.download's keyword arguments")
    p.add_argument("--guard-pid", type=int, help="stop at once when this process exits")
    args = p.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    threading.Thread(target=_watch, args=(os.getppid(), args.guard_pid), daemon=True).start()
    with open(args.job, encoding="utf-8") as f:
        kwargs = json.load(f)
    from img2dataset import download

    if kwargs.get("distributor") == "pyspark":
        # img2dataset would build a local[N] session itself; one made here first is picked
        # up instead, and takes its master from the environment (PYSPARK_SUBMIT_ARGS=
        # "--master spark://host:7077 pyspark-shell", spark-defaults.conf), so a cluster works.
        spark = _spark_session()
        try:
            download(**kwargs)
        finally:
            spark.stop()  # the executors end, and their guards write their summaries
        return 0
    download(**kwargs)
    return 0


def _spark_session():  # noqa: ANN202 - pyspark is imported only for this distributor
    """The crawl's Spark session; on a guarded crawl every executor starts its own guard
    (pipeline/guard/spark_hook.py) before its Python workers exist."""
    from pyspark.sql import SparkSession

    from pipeline.guard import spark_hook

    builder = SparkSession.builder.appName("witforge-crawl")
    settings = os.environ.get(spark_hook.SETTINGS_ENV)
    if settings:
        builder = (builder.config("spark.python.use.daemon", "true")
                   .config("spark.python.daemon.module", "pipeline.guard.spark_hook")
                   .config(f"spark.executorEnv.{spark_hook.SETTINGS_ENV}", settings)
                   .config(f"spark.executorEnv.{spark_hook.EVENTS_ENV}",
                           os.environ[spark_hook.EVENTS_ENV])
                   .config("spark.executorEnv.PYTHONPATH", str(REPO_ROOT)))
    return builder.getOrCreate()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
