"""The crawl stops, resumable and with a clear error, before its disk fills.

On a full disk img2dataset's writers fail sample by sample and its pool can stall without
exiting (seen on an 800 KB tmpfs: the stage hung until killed). `crawl.min_free_mb` is
checked before the crawl and while the worker runs; here it is set a few KB under the
disk's real free space, so the crawl's own writes cross it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import duckdb
import pytest

from pipeline.config import load_build
from pipeline.demoweb.pool import FIXTURE_DIR
from pipeline.demoweb.server import DemoWeb
from pipeline.stage import StageError, get_spec, kept_of, run_stage, stage_dir
from tests.test_crawl import GOOD, _alive, _make_build, _pool_ids

MARGIN = 24 * 1024  # bytes of headroom: less than one shard of the crawl below writes


@pytest.fixture(scope="module")
def web():
    with DemoWeb(FIXTURE_DIR) as w:
        yield w


def _with_floor(y: Path, floor_mb: float) -> None:
    text = y.read_text().replace("guard: false}", f"guard: false, min_free_mb: {floor_mb!r}}}")
    y.write_text(text)


def _rows(base: str) -> list[tuple[str, str]]:
    ids = iter(_pool_ids())
    return [(f"{p} picture {i}", f"{base}/{p}/{i}")
            for p, n in GOOD.items() for i in (next(ids) for _ in range(n))]


def test_a_disk_floor_above_free_space_refuses_before_any_download(web, tmp_path: Path):
    y = _make_build(tmp_path, _rows(web.base_url))
    _with_floor(y, 10.0**9)  # a petabyte
    with pytest.raises(StageError, match=r"MB free on the disk holding .*crawl\.min_free_mb "
                                         r"\(1e\+09 MB\)"):
        run_stage(load_build(y), "crawl", log=lambda s: None)
    cfg = load_build(y)
    assert not (cfg.run_dir / "06_crawl.work").exists()
    assert not stage_dir(cfg, get_spec("crawl")).exists()


def test_the_crawl_stops_when_its_writes_cross_the_floor_and_a_rerun_finishes(web, tmp_path):
    rows = _rows(web.base_url)
    y = _make_build(tmp_path, rows)
    text = y.read_text()
    _with_floor(y, (shutil.disk_usage(tmp_path).free - MARGIN) / 2**20)
    with pytest.raises(StageError, match="the crawl stopped before the disk filled"):
        run_stage(load_build(y), "crawl", log=lambda s: None)
    cfg = load_build(y)
    attempt = cfg.run_dir / "06_crawl.work" / "attempt_000"
    worker = int((attempt / "worker.pid").read_text())  # it had started downloading
    deadline = time.time() + 10
    while _alive(worker):
        assert time.time() < deadline, "the img2dataset worker outlived the stopped crawl"
        time.sleep(0.1)
    assert not stage_dir(cfg, get_spec("crawl")).exists()  # nothing half-written is kept

    y.write_text(text)  # space again (the default floor, 256 MB)
    report = run_stage(load_build(y), "crawl", log=lambda s: None)
    assert report["rows_in"] == len(rows) == report["kept"] + report["dropped"]
    assert report["kept"] == sum(GOOD.values())
    kept = duckdb.sql(f"SELECT count(DISTINCT uid) FROM '{kept_of(cfg, 'crawl')}'").fetchall()
    assert kept == [(len(rows),)]
