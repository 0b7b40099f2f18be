"""The guard on a Spark cluster: every executor starts its own guarding proxy, on its own host.

With ``crawl.distributor: pyspark`` and ``crawl.guard: true`` on a cluster, img2dataset's
downloads run in Python workers on other machines, which cannot reach the proxy on the driver's
loopback. So the crawl worker (``pipeline/crawl_worker.py``) sets Spark's
``spark.python.daemon.module`` to this module: every executor's Python daemon — the process
that forks that executor's Python workers — runs :func:`ensure_guard` first and then pyspark's
own daemon. ``ensure_guard`` starts a guard on the executor's 127.0.0.1 with the crawl's
settings (``WITFORGE_GUARD_SETTINGS_FILE``: the crawl attempt's ``guard-settings.json``, on the
shared file system the recipe needs anyway) and puts ``http_proxy``/``https_proxy``/… in the
daemon's environment before any worker is forked, so every request of every task of that
executor goes through it. Its event log is ``guard-<host>-<pid>.jsonl`` in the attempt folder
(``WITFORGE_GUARD_EVENTS_DIR``); the crawl's report merges them (``guards``).

Why an executor-side hook and not "the first task on a host starts one under a host-wide lock":
the guard then lives exactly as long as the executor (it exits when the daemon's pipe closes:
an executor lost mid-crawl takes its guard along, and the task retried on a new executor gets a
new one), no task can run before its guard is up, and no lock or reference count has to be
shared between executors. With one executor per host (the recipe's spark.executor.cores = the
host's cores) that is one guard per host; a host running two executors runs two, and a
domain's global rate is then executors x the per-guard rate (the planner's "x nodes").

In local mode the daemon inherits the driver's environment, already routed through the stage's
own guard (``WITFORGE_GUARD_URL``): nothing is started then.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from pipeline.guard.proxy import GuardProxy
from pipeline.guard.server import GuardSettings

SETTINGS_ENV = "WITFORGE_GUARD_SETTINGS_FILE"
EVENTS_ENV = "WITFORGE_GUARD_EVENTS_DIR"
URL_ENV = "WITFORGE_GUARD_URL"  # the guard this process's environment already routes through

_guard: GuardProxy | None = None  # held for the daemon's lifetime


def ensure_guard() -> GuardProxy | None:
    """Start this executor's guard and route this process's (and its children's) requests
    through it; None when the process is not a guarded crawl's or already behind a guard."""
    global _guard
    settings_file = os.environ.get(SETTINGS_ENV)
    if not settings_file or _guard is not None or os.environ.get(URL_ENV):
        return _guard
    settings = GuardSettings(**json.loads(Path(settings_file).read_text(encoding="utf-8")))
    folder = Path(os.environ.get(EVENTS_ENV) or Path(settings_file).parent)
    name = f"guard-{socket.gethostname()}-{os.getpid()}"
    # its own session: pyspark's daemon ends with a SIGHUP to its process group, which would
    # kill the guard before it writes its summary; it exits when this process's pipe closes
    guard = GuardProxy(settings, events_path=folder / f"{name}.jsonl",
                       log_path=folder / f"{name}.log", new_session=True).start()
    os.environ.update(guard.env())
    os.environ[URL_ENV] = guard.url
    for k in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        os.environ.pop(k, None)
    _guard = guard
    return guard


def main() -> None:
    ensure_guard()
    from pyspark.daemon import manager

    manager()


if __name__ == "__main__":
    main()
