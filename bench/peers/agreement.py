"""`witforge evaluate` against CLIP_benchmark itself: the same checkpoint on the same eval set.

CLIP_benchmark runs in its own venv (``bench.peers.peer_python``) through
``clip_benchmark_run.py``; ours runs in process through ``training.evaluate``. Used by
``bench/bench_eval.py`` (the demo's checkpoint and sets) and ``tests/test_clip_benchmark.py``
(a small checkpoint and sets made from the committed fixture).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from bench.peers import REPO, run_peer

# ours -> CLIP_benchmark's name. CLIP_benchmark's "image_retrieval" is text -> image.
CLASSIFICATION = {"top1": "acc1", "top5": "acc5", "mean_per_class_recall": "mean_per_class_recall"}
RETRIEVAL = {f"{ours}_R@{k}": f"{theirs}_recall@{k}" for k in (1, 5, 10)
             for ours, theirs in (("image_to_text", "text_retrieval"),
                                  ("text_to_image", "image_retrieval"))}


def task_of(set_dir: Path) -> str:
    kind = (set_dir / "dataset_type.txt")
    if kind.is_file() and kind.read_text().strip().lower() == "retrieval":
        return "zeroshot_retrieval"
    return "zeroshot_classification"


def clip_benchmark_scores(checkpoint: Path, model: str, set_dir: Path, amp: bool = False,
                          batch_size: int = 64) -> dict[str, Any]:
    """CLIP_benchmark's metrics for one set: ``clip_benchmark eval`` on the webdataset set,
    CPU, fp32 unless ``amp`` (its default: bf16 autocast on a CPU)."""
    task = task_of(set_dir)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = [str(REPO / "training" / "model_configs"), "--", "eval",
                "--dataset", f"wds/{set_dir.name}", "--dataset_root", str(set_dir),
                "--task", task, "--model", model, "--pretrained", str(checkpoint),
                "--output", str(out), "--batch_size", str(batch_size), "--num_workers", "0",
                "--recall_k", "1", "5", "10"]
        if not amp:
            args.append("--no_amp")
        run_peer("clip_benchmark", "clip_benchmark_run.py", args, timeout=1800)
        return json.loads(out.read_text())["metrics"]


def witforge_scores(checkpoint: Path, model: str, set_dir: Path,
                    templates: str = "dataset") -> dict[str, Any]:
    from training.evaluate import retrieval, zero_shot
    from training.model import load_for_inference

    net, preprocess, tokenizer = load_for_inference(model, checkpoint)
    if task_of(set_dir) == "zeroshot_retrieval":
        return retrieval(net, preprocess, tokenizer, set_dir)
    return zero_shot(net, preprocess, tokenizer, set_dir, templates)


def compare(checkpoint: Path, model: str, set_dir: Path, amp: bool = False) -> dict[str, Any]:
    """Both tools' numbers side by side, and how many images each difference is."""
    ours = witforge_scores(checkpoint, model, set_dir)
    theirs = clip_benchmark_scores(checkpoint, model, set_dir, amp=amp)
    names = RETRIEVAL if task_of(set_dir) == "zeroshot_retrieval" else CLASSIFICATION
    n = ours.get("n") or ours.get("images")
    rows = []
    for mine, their in names.items():
        diff = ours[mine] - theirs[their]
        rows.append({"metric": mine, "witforge": ours[mine], "clip_benchmark": theirs[their],
                     "diff": diff, "diff_in_items": round(diff * (ours.get("texts") if
                                                                  mine.startswith("text_to")
                                                                  else n))})
    return {"set": set_dir.name, "task": task_of(set_dir), "amp": amp, "n": n, "rows": rows,
            "equal": all(abs(r["diff"]) < 1e-12 for r in rows)}
