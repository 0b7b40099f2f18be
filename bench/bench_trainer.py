"""`witforge train` against open_clip's own trainer (`open_clip_train.main`), the tool users would
run instead, on the same shards, model, batch, precision, threads and loader workers.

open_clip_train runs in a venv of its own (its [training] extra pins webdataset<=0.2.86); both
run as fresh processes, alternating (ours, theirs, ours, theirs ...) so load from other
processes hits both alike. Both sides: witforge-tiny, batch 64, fp32 (open_clip_train's default
`--precision amp` autocasts to bf16 on a CPU, a different computation), resampled shards, 2
loader workers, torch's default threads, no checkpoints, no eval. Figures per run: wall time of
the whole process, and steady samples/s = batch / the median over 10-step windows (after the
first) of the mean step time — what open_clip_train logs as `Batch (t)` every 10 steps, and the
same windows of our metrics.jsonl. ``ratio`` = ours / theirs of the median steady samples/s.

Shards: runs/demo/compare/arms/raw/14_shard (every crawled demo image, real JPEGs; or the
folder in $WITFORGE_BENCH_SHARDS) when `make demo` has run, else toy shards.

    python -m bench.bench_trainer [--quick] [--rounds N] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.peers import REPO, peer_python

RESULTS = Path(__file__).parent / "results" / "trainer.json"
ARCH, BATCH, WORKERS, WINDOW, LR, WARMUP = "witforge-tiny", 64, 2, 10, 5e-4, 10
_BATCH_T = re.compile(r"Batch \(t\): ([0-9.]+),")


def _shards(tmp: Path) -> tuple[list[str], str]:
    # the demo's raw arm: every crawled demo image, re-sharded by the shard stage's writer
    demo = Path(os.environ.get("WITFORGE_BENCH_SHARDS", REPO / "runs" / "demo" / "compare" /
                               "arms" / "raw" / "14_shard"))
    tars = sorted(demo.glob("shard-*.tar"))
    if not tars:
        from training.toydata import write_toy_shards

        tars = [Path(p) for p in write_toy_shards(tmp / "toy", 2000, per_shard=500, size=96)]
    return [str(t) for t in tars], str(tars[0].parent)


def _brace(tars: list[str]) -> str:
    """shard-000000.tar .. shard-00000N.tar as one webdataset brace pattern."""
    first, last = Path(tars[0]).stem.split("-")[-1], Path(tars[-1]).stem.split("-")[-1]
    prefix = Path(tars[0]).name.rsplit("-", 1)[0]
    return str(Path(tars[0]).parent / f"{prefix}-{{{first}..{last}}}.tar")


def _windows(step_times: list[float]) -> list[float]:
    """Samples/s of each full 10-step window after the first (start-up)."""
    return [BATCH / statistics.mean(step_times[i:i + WINDOW])
            for i in range(WINDOW, len(step_times) - WINDOW + 1, WINDOW)]


def run_ours(tars: list[str], out: Path, steps: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "training.train", "--train-data", *tars, "--model",
                    ARCH, "--batch-size", str(BATCH), "--steps", str(steps), "--workers",
                    str(WORKERS), "--precision", "fp32", "--lr", str(LR), "--warmup",
                    str(WARMUP), "--save-every", str(10 * steps), "--keep", "0", "--out",
                    str(out)], check=True, cwd=REPO, env=env, capture_output=True)
    wall = time.time() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_s"] for r in rows if "step_s" in r]
    # open_clip_train's window mean averages steps 2..10 of a log window (its first log line
    # covers one step): ours are cut the same way, from step 11 on
    return {"wall_s": round(wall, 1), "steady_samples_per_s": statistics.median(_windows(times)),
            "steps": len(times)}


def run_theirs(tars: list[str], logs: Path, steps: int) -> dict:
    python = peer_python("open_clip_train")
    args = [str(REPO / "training" / "model_configs"), "--", "--train-data", _brace(tars),
            "--train-num-samples", str(steps * BATCH), "--dataset-type", "webdataset",
            "--dataset-resampled", "--model", ARCH, "--batch-size", str(BATCH), "--workers",
            str(WORKERS), "--precision", "fp32", "--epochs", "1", "--lr", str(LR), "--warmup",
            str(WARMUP), "--save-frequency", "0", "--logs", str(logs), "--name", "run",
            "--log-every-n-steps", str(WINDOW), "--report-to", "", "--seed", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("PYTHONPATH", None)
    t0 = time.time()
    r = subprocess.run([str(python), str(REPO / "bench" / "peers" / "open_clip_train_run.py"),
                        *args], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError("open_clip_train failed:\n" + r.stderr[-3000:])
    log = (logs / "run" / "out.log").read_text()
    # one line per 10 steps, after the first line (step 1): the window's mean step time
    means = [float(m) for m in _BATCH_T.findall(log)][1:]
    full = [BATCH / t for t in means[1:-1] or means]  # the last window may be partial
    return {"wall_s": round(wall, 1), "steady_samples_per_s": statistics.median(full),
            "log_windows": len(means)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 round of 40 steps")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    p.add_argument("--steps", type=int, default=100, help="steps per run (default 100)")
    a = p.parse_args(argv)
    rounds, steps = (1, 40) if a.quick else (a.rounds, a.steps)
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tars, where = _shards(Path(tmp))
        for i in range(rounds):
            ours.append(run_ours(tars, Path(tmp) / f"ours{i}", steps))
            theirs.append(run_theirs(tars, Path(tmp) / f"theirs{i}", steps))
            print(f"round {i + 1}: witforge train {ours[-1]['steady_samples_per_s']:.1f} "
                  f"samples/s (wall {ours[-1]['wall_s']} s), open_clip_train "
                  f"{theirs[-1]['steady_samples_per_s']:.1f} (wall {theirs[-1]['wall_s']} s)")
    o = statistics.median(r["steady_samples_per_s"] for r in ours)
    t = statistics.median(r["steady_samples_per_s"] for r in theirs)
    result = {"area": "trainer", "command": "python -m bench.bench_trainer"
              + (" --quick" if a.quick else ""), "shards": where, "model": ARCH,
              "batch_size": BATCH, "steps": steps, "workers": WORKERS, "precision": "fp32",
              "rounds": rounds, "ours": ours, "open_clip_train": theirs,
              "summary": {"ours_samples_per_s": round(o, 1),
                          "open_clip_train_samples_per_s": round(t, 1),
                          "ratio": round(o / t, 3),
                          "wall_ratio": round(statistics.median(r["wall_s"] for r in theirs)
                                              / statistics.median(r["wall_s"] for r in ours), 3)},
              "load_average_1min": round(os.getloadavg()[0], 2), "quick": a.quick}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
