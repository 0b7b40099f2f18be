"""CLIP_benchmark itself, in a venv of its own, reads the eval sets we write and scores a
checkpoint exactly as `witforge evaluate` does (fp32: CLIP_benchmark's --no_amp).

The first run builds .venv-peers/clip_benchmark (one pip command, ~1.5 min here); later runs
reuse it. The demo's own checkpoint and sets are compared by `make bench` (bench_eval)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import training.model as M
from bench.peers import peer_python
from bench.peers.agreement import compare, task_of
from pipeline.demoweb.pool import FIXTURE_DIR
from training.evalsets import write_pool_sets


@pytest.fixture(scope="module")
def clip_benchmark_venv():
    return peer_python("clip_benchmark", log=lambda s: None)


def _fixture_pool_all_heldout(dest: Path) -> Path:
    shutil.copytree(FIXTURE_DIR / "images", dest / "images")
    t = pq.read_table(FIXTURE_DIR / "pool.parquet")
    t = t.set_column(t.schema.get_field_index("split"), "split",
                     pa.array(["heldout"] * t.num_rows))
    pq.write_table(t, dest / "pool.parquet")
    return dest


def test_clip_benchmark_reads_our_sets_and_gives_our_numbers(tmp_path, clip_benchmark_venv):
    pool = _fixture_pool_all_heldout(tmp_path / "pool")
    sets = write_pool_sets(pool, tmp_path / "eval")  # the demo's writer, on real images
    torch.manual_seed(0)
    model, _, _, _ = M.create("witforge-micro")
    ckpt = tmp_path / "model.pt"
    torch.save({"state_dict": model.state_dict(), "arch": "witforge-micro"}, ckpt)
    tasks = set()
    for set_dir in sets.values():
        r = compare(ckpt, "witforge-micro", set_dir)
        tasks.add(task_of(set_dir))
        assert r["n"] >= 100
        for row in r["rows"]:  # the same items right, to the last digit
            assert abs(row["diff"]) < 1e-12, (set_dir.name, row)
    assert tasks == {"zeroshot_classification", "zeroshot_retrieval"}
