"""The train loop end to end on toy shards: checkpoints open_clip can load, resume after a
kill, and a 2-process torchrun (gloo) run matching a 1-process run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch

import training.model  # noqa: F401  (registers the witforge-* configs with open_clip)
from training.toydata import write_toy_shards
from training.train import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_shards")
    write_toy_shards(d, 96, per_shard=24, corrupt=(10,), size=32)
    return d


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _args(shards, out, *extra, workers=0):
    return ["--train-data", str(shards), "--model", "witforge-micro", "--batch-size", "8",
            "--out", str(out), "--warmup", "2", "--lr", "1e-3", "--workers", str(workers),
            "--threads", "1", *extra]


def test_small_run_writes_metrics_plot_and_checkpoints_open_clip_loads(shards, tmp_path, capfd):
    out = tmp_path / "run"
    assert main(_args(shards, out, "--steps", "4", "--save-every", "2", "--accum-freq", "2",
                      "--no-resampled", "--shuffle-buffer", "0")) == 0
    # stderr is not a terminal here: the bar is drawn at the start and the end, not per step
    assert capfd.readouterr().err.count("train:") <= 3
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["logit_scale"] <= 100.0 for r in rows)
    assert rows[-1]["samples_seen"] == 4 * 16
    assert rows[-1]["skipped"] == 1  # the corrupt sample, counted and reported
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_samples"] == {"bad_image": 1}
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_000002.pt", "step_000004.pt"]
    for ckpt in (out / "model.pt", out / "checkpoints" / "step_000004.pt"):
        model, _, preprocess = open_clip.create_model_and_transforms(
            "witforge-micro", pretrained=str(ckpt))
        saved = torch.load(ckpt, weights_only=True)["state_dict"]
        assert torch.equal(model.state_dict()["logit_scale"], saved["logit_scale"])
        assert torch.equal(model.visual.conv1.weight, saved["visual.conv1.weight"])


def test_resume_after_kill_continues_with_the_same_next_batch(shards, tmp_path):
    common = ["--steps", "40", "--save-every", "3", "--seed", "5", "--shuffle-buffer", "30"]
    ref = tmp_path / "ref"
    assert main(_args(shards, ref, *common, "--stop-at", "9", workers=2)) == 0
    reference = {r["step"]: r for r in _rows(ref)}

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "training.train", *_args(shards, out, *common, workers=2)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "step_000003.pt").exists():
            assert proc.poll() is None and time.time() < deadline, "training never saved"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    saved = max(int(p.stem.split("_")[1]) for p in (out / "checkpoints").glob("step_*.pt"))
    assert saved < 9

    assert main(_args(shards, out, *common, "--resume", "latest", "--stop-at", "9",
                      workers=2)) == 0
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, 10))  # rows after the checkpoint redone
    for r in rows[saved:]:
        assert r["batch"] == reference[r["step"]]["batch"]
        assert r["loss"] == pytest.approx(reference[r["step"]]["loss"], abs=1e-4)


def test_two_process_torchrun_matches_one_process_on_the_same_global_batch(shards, tmp_path):
    data = ["--no-resampled", "--shuffle-buffer", "0", "--split", "sample", "--no-augment",
            "--steps", "3", "--save-every", "100"]
    one = tmp_path / "one"
    assert main(["--train-data", str(shards), "--model", "witforge-micro", "--batch-size",
                 "16", "--out", str(one), "--workers", "0", "--warmup", "1", "--threads", "1",
                 *data]) == 0
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", "-m", "training.train", "--train-data",
                    str(shards), "--model", "witforge-micro", "--batch-size", "8", "--out",
                    str(two), "--workers", "0", "--warmup", "1", *data],
                   cwd=ROOT, env=env, check=True, timeout=240, capture_output=True)
    r1, r2 = _rows(one), _rows(two)
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    assert [r["samples_seen"] for r in r2] == [r["samples_seen"] for r in r1]
    for a, b in zip(r1, r2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-3)
    assert r1[0]["loss"] != pytest.approx(r1[-1]["loss"], abs=1e-3)  # it did train
