"""One img2dataset download in its own process: `python -m pipeline.crawl_worker JOB.json`.

JOB.json holds the keyword arguments of ``img2dataset.download``. The crawl stage starts
this module in a new session (its own process group) so that img2dataset's spawned pool
and logger processes can be stopped together, and so that a 5 s import and any crash in a
download process stay out of the stage's process.

If the stage process dies (even by SIGKILL), a watchdog thread here notices that the
parent changed and kills the whole group: otherwise orphaned pool workers would keep
writing shards while a rerun resumes the same folder.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time


def _watch_parent(parent: int) -> None:
    # Only a session leader may kill its group: started any other way (by hand, in a
    # debugger), the group would include the caller's shell.
    if os.getsid(0) != os.getpid():
        return
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os.killpg(os.getpgid(0), signal.SIGKILL)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m pipeline.crawl_worker JOB.json", file=sys.stderr)
        return 2
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    with open(argv[0], encoding="utf-8") as f:
        kwargs = json.load(f)
    from img2dataset import download

    if kwargs.get("distributor") == "pyspark":
        # img2dataset would build a local[N] session itself; one made here first is picked
        # up instead, and takes its master from the environment (PYSPARK_SUBMIT_ARGS=
        # "--master spark://host:7077 pyspark-shell", spark-defaults.conf), so a cluster works.
        from pyspark.sql import SparkSession

        SparkSession.builder.appName("witforge-crawl").getOrCreate()
    download(**kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
