"""A stage that fills its disk fails naming the stage and the folder, keeps nothing
half-written, and a rerun with space finishes the job.

The full disk is real: a 8 KB tmpfs mounted in a private mount namespace (`unshare -m`, so
nothing outside the test sees it), and the real errors of /dev/full.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from pipeline.stage import disk_full

REPO = Path(__file__).resolve().parents[1]


def _error(fn) -> BaseException:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - the error itself is what is tested
        return e
    raise AssertionError("no error")


def test_disk_full_knows_enospc_from_python_and_from_duckdb() -> None:
    def python_write() -> None:
        with open("/dev/full", "w") as f:
            f.write("x" * 100_000)

    def duckdb_copy() -> None:
        duckdb.sql("COPY (SELECT range FROM range(100000)) TO '/dev/full' (FORMAT parquet)")

    assert disk_full(_error(python_write))
    assert disk_full(_error(duckdb_copy))
    assert not disk_full(_error(lambda: open("/nonexistent/x", "w")))
    assert not disk_full(_error(lambda: duckdb.sql("SELECT * FROM '/nonexistent/x.parquet'")))


def _in_namespace(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


def _need_private_mounts(folder: Path) -> None:
    """Skip only where this machine cannot make a private mount namespace (not root, or no
    unshare); here and in CI it can, and these tests run."""
    try:
        probe = _in_namespace(f"mount -t tmpfs -o size=4k tmpfs {folder}")
    except FileNotFoundError as e:  # no unshare binary
        pytest.skip(f"no unshare here: {e}")
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.strip()}")


def test_a_stage_that_fills_its_disk_keeps_nothing_and_a_rerun_finishes(tmp_path: Path):
    runs = tmp_path / "runs"
    runs.mkdir()
    rows = "".join(f"a photo of thing number {i} on a table\thttp://h.org/{i}.jpg\n"
                   for i in range(2000))
    (tmp_path / "pairs.tsv").write_text(rows)
    y = tmp_path / "build.yaml"
    y.write_text(f"name: t\nruns_dir: {runs}\nsources:\n"
                 "  - {path: pairs.tsv, format: tsv, header: false, caption_col: column0, "
                 f"url_col: column1}}\nduckdb: {{temp_directory: {tmp_path / 'spill'}}}\n")
    _need_private_mounts(runs)
    ingest = f"{sys.executable} -m pipeline.cli ingest --build {y}"
    out = _in_namespace(
        f"mount -t tmpfs -o size=8k tmpfs {runs} && "
        f"{{ {ingest}; echo rc=$?; ls -A {runs / 't'}; "
        f"mount -o remount,size=10m {runs} && {ingest} && ls -A {runs / 't'}; }}")
    assert out.returncode == 0, out.stderr
    full, _, after = out.stdout.partition("rc=2\n")
    assert f"witforge ingest: error: stage ingest: no space left on the disk holding " \
           f"{runs / 't'}" in out.stderr
    assert "nothing half-written was kept: free some space and rerun" in out.stderr
    left, _, rerun = after.partition("[01_ingest]")
    assert left.split() == []  # no stage folder, no temp folder
    assert "2,000 in → 2,000 kept" in rerun and "01_ingest" in rerun.split()


def test_a_checkpoint_that_does_not_fit_leaves_no_partial_file(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save = ("import torch; from pathlib import Path; from training.checkpoint import save_atomic\n"
            "try:\n"
            f"    save_atomic({{'w': torch.zeros(100_000)}}, Path('{folder}') / 'step_1.pt')\n"
            "except OSError as e:\n"
            "    print('errno', e.errno)\n")
    script = tmp_path / "save.py"
    script.write_text(save)
    _need_private_mounts(folder)
    out = _in_namespace(f"mount -t tmpfs -o size=64k tmpfs {folder} && "
                        f"{sys.executable} {script} && ls -A {folder}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["errno", "28"]  # the error, and nothing left in the folder
