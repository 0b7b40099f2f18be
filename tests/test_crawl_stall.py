"""A crawl whose img2dataset pool lost its download processes stops instead of hanging.

When a download process dies mid-shard (the OOM killer, a crash in a decoder),
``multiprocessing.Pool.imap_unordered`` waits forever for its result. The fault here is real:
SIGKILL to every process of img2dataset's pool while shards are in flight.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_build
from pipeline.demoweb.pool import FIXTURE_DIR
from pipeline.demoweb.server import DemoWeb
from pipeline.stage import get_spec, run_stage, stage_dir
from tests.test_crawl import REPO, _alive, _make_build, _pool_ids

SLOW, GOOD = 30, 40  # slow URLs (4 s, over the 2 s timeout) keep shards in flight


def _children(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                kids.append(int(d))
    return kids


def test_a_pool_that_lost_its_processes_is_stopped_and_a_rerun_finishes(tmp_path: Path):
    with DemoWeb(FIXTURE_DIR, slow_seconds=4) as web:
        ids = iter(_pool_ids())
        rows = [(f"slow {i}", f"{web.base_url}/f/slow/{next(ids)}") for i in range(SLOW)]
        rows += [(f"img {i}", f"{web.base_url}/img/{next(ids)}") for i in range(GOOD)]
        y = _make_build(tmp_path, rows)
        plain = y.read_text().replace("processes_count: 1", "processes_count: 2")
        y.write_text(plain.replace("guard: false}", "guard: false, stall_minutes: 0.25}"))
        images = tmp_path / "runs" / "t" / "06_crawl.work" / "attempt_000" / "images"
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "crawl", "--build", str(y)], cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 90
            while not list(images.glob("*_stats.json")):  # shards are being downloaded
                assert proc.poll() is None and time.time() < deadline
                time.sleep(0.05)
            worker = int((images.parent / "worker.pid").read_text())
            for pid in _children(worker):  # img2dataset's pool (and its logger)
                os.kill(pid, signal.SIGKILL)
            started = time.time()
            _, err = proc.communicate(timeout=120)
            waited = time.time() - started
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 2, err
        assert "img2dataset wrote nothing to" in err and "crawl.stall_minutes" in err
        # the pool's new processes take the shards not yet started; the lost ones never end,
        # so once those are done nothing is written for 15 s, and the stage stops
        assert 15 <= waited < 110
        deadline = time.time() + 10
        while _alive(worker):
            assert time.time() < deadline, "the stalled worker outlived the stage"
            time.sleep(0.1)
        cfg = load_build(y)
        assert not stage_dir(cfg, get_spec("crawl")).exists()

        y.write_text(plain)  # the default limit (30 min) and a healthy pool
        report = run_stage(load_build(y), "crawl", log=lambda s: None)
    assert report["rows_in"] == SLOW + GOOD == report["kept"] + report["dropped"]
    assert report["kept"] == GOOD and report["dropped_by_reason"] == {"timeout": SLOW}


def test_a_stall_limit_shorter_than_a_silent_shard_is_refused(tmp_path: Path) -> None:
    y = _make_build(tmp_path, [("a cat", "http://127.0.0.1:9/a.jpg")])
    y.write_text(y.read_text().replace("guard: false}", "guard: false, stall_minutes: 0.05}"))
    # 10 samples per shard / 4 threads -> 3 rounds x 2 s timeout
    with pytest.raises(ConfigError, match=r"build.yaml: crawl.stall_minutes: 0.05 is shorter "
                                          r"than a healthy crawl can stay silent: .* for 6 s"):
        load_build(y)
