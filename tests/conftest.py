"""Shared fixtures. Tests use real DuckDB, img2dataset, webdataset and open_clip."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil
import tempfile

import pytest

# A full run peaks at about 0.65 GiB of scratch (pytest's tmp_path folders). A disk that fills
# mid-run shows up as an INTERNALERROR in an unrelated test, so refuse to start instead.
_SCRATCH_NEEDED = 1 << 30


def pytest_sessionstart(session: pytest.Session) -> None:
    base = session.config.option.basetemp or tempfile.gettempdir()
    while not os.path.exists(base):
        base = os.path.dirname(os.path.abspath(base))
    free = shutil.disk_usage(base).free
    if free < _SCRATCH_NEEDED:
        pytest.exit(f"the tests need about 1 GiB of scratch space under {base} but only "
                    f"{free / 2**30:.2f} GiB is free; free some space or point TMPDIR or "
                    "--basetemp at a larger disk", returncode=3)
