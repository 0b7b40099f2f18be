"""What a resumed crawl may keep of an attempt's shards, and who may still be writing them.

img2dataset resumes whole shards (``incremental_mode``): a shard counts as done when its
``_stats.json`` exists. Before a resume, a shard is kept only if

* it is provably complete: stats parse, the parquet has ``count`` rows, the tar is whole and
  holds ``successes`` images (:func:`_shard_ok`; stats are not written atomically and a
  killed process can leave a tar without them), and
* it is undisturbed: the stage saw it finished while the stage and its guard proxy were both
  alive (``confirmed.txt``, :func:`confirm_shards`).

The second rule closes the window of issue 15. When the stage process dies (``kill -9``, the
OOM killer, a scheduler ending the job), the guard proxy and, in ``make demo``, the demo web
die with it, while img2dataset's worker lives on for a moment in its own session: every
request still in flight, and every one made after, fails at once ("Remote end closed
connection", "Connection refused"), and a shard it finishes then holds those failures as if
the web had given them. The stage lists the finished shards every 0.25 s, *then* checks that
its guard still runs, and only then records them: every request of a recorded shard ended
before a moment at which the guard (and the stage, and the web in it) was provably alive. A
shard finished after the last record (at most one poll, 0.25 s, of shards, plus whatever
finished after the death) is deleted and downloaded again. No clock is compared.
"""

from __future__ import annotations

import json
import os
import signal
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.stage import StageError

if TYPE_CHECKING:
    from pipeline.crawl_attempt import Attempt

CONFIRMED = "confirmed.txt"


def shard_name(stats: Path) -> str:
    return stats.name[: -len("_stats.json")]


def confirmed_shards(attempt: Attempt) -> set[str]:
    """The shards the stage saw finished while it and its guard were alive."""
    try:
        text = (attempt.folder / CONFIRMED).read_text(encoding="ascii")
    except FileNotFoundError:
        return set()
    return {x for x in text.split("\n")[:-1] if x}  # the last piece: "" or a cut line


def confirm_shards(attempt: Attempt, names: Iterable[str]) -> None:
    """Record finished shards; call only after checking, *after* listing them, that the
    guard still runs (the caller being alive is the rest of the proof)."""
    data = "".join(f"{n}\n" for n in sorted(names)).encode("ascii")
    if not data:
        return
    fd = os.open(attempt.folder / CONFIRMED, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_confirmed(attempt: Attempt, names: set[str]) -> None:
    tmp = attempt.folder / (CONFIRMED + ".tmp")
    tmp.write_text("".join(f"{n}\n" for n in sorted(names)), encoding="ascii")
    tmp.replace(attempt.folder / CONFIRMED)


def _shard_ok(stats: Path) -> bool:
    try:
        s = json.loads(stats.read_text())
        results = stats.with_name(stats.name.replace("_stats.json", ".parquet"))
        if pq.ParquetFile(results).metadata.num_rows != s["count"]:
            return False
        tar = stats.with_name(stats.name.replace("_stats.json", ".tar"))
        with tarfile.open(tar) as t:
            members = t.getmembers()
        # tarfile stops quietly at a cut; every success is <key>.{jpg,txt,json} in the tar.
        end = max((m.offset_data + m.size for m in members), default=0)
        return (end <= tar.stat().st_size
                and sum(m.name.endswith(".json") for m in members) == s["successes"])
    except (OSError, ValueError, KeyError, tarfile.TarError, pa.ArrowException):
        return False


def clean_partial_shards(attempt: Attempt) -> int:
    """Remove every shard that is not provably complete and undisturbed, so img2dataset
    downloads it again; the number of shards removed."""
    confirmed = confirmed_shards(attempt)
    good = {shard_name(p) for p in attempt.stats_files()
            if shard_name(p) in confirmed and _shard_ok(p)}
    # The record shrinks before any file goes: a kill in between leaves a shard unconfirmed
    # (redone next time), never a new download of it recorded by the old entry.
    if confirmed != good:
        _write_confirmed(attempt, good)
    if not attempt.images.exists():
        return 0
    removed = set()
    for p in attempt.images.iterdir():
        shard = p.name.split("_")[0].split(".")[0]
        if p.is_file() and shard.isdigit() and shard not in good:
            p.unlink()
            removed.add(shard)
    return len(removed)


def _is_worker(pid: int, attempt: Attempt) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"pipeline.crawl_worker" in cmd and str(attempt.folder).encode() in cmd


def _group_left_in(pgid: int, folder: Path) -> list[int]:
    """Processes of group ``pgid`` working in ``folder`` (img2dataset's pool runs in the
    worker's folder; a reused pid's group would not)."""
    want, found = str(folder.resolve()), []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and os.readlink(f"/proc/{d}/cwd") == want:
                found.append(int(d))
        except (OSError, IndexError, ValueError):
            continue
    return found


def stop_stale_worker(attempt: Attempt) -> None:
    """Make sure nothing left by an earlier run still writes this attempt.

    A worker whose stage died kills its own group at once (pipeline/crawl_worker.py), so one
    still alive after 10 s belongs to a live stage: another `witforge crawl` on this build.
    Processes of its group that outlived the worker itself (img2dataset's pool, when only the
    worker was killed) are killed here: a shard they finished after this check would be
    resumed as done."""
    pid_file = attempt.folder / "worker.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text() or 0)
    if not pid:
        return
    deadline = time.time() + 10
    while _is_worker(pid, attempt):
        if time.time() > deadline:
            raise StageError(f"a crawl worker (pid {pid}) is still writing {attempt.folder}; "
                             "is another `witforge crawl` running on this build?")
        time.sleep(0.2)
    deadline = time.time() + 10
    while left := _group_left_in(pid, attempt.folder):
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.time() > deadline:
            raise StageError(f"processes {left} of an earlier crawl worker (pid {pid}) in "
                             f"{attempt.folder} do not die")
        time.sleep(0.1)
