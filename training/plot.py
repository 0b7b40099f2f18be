"""PNG of the training loss (and eval metrics, when there are any) from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: Path, out_png: Path) -> Path:
    rows = read_metrics(metrics_path)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    n_plots = 2 if evals else 1
    fig, axes = plt.subplots(1, n_plots, figsize=(6 * n_plots, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    if evals:
        ax2 = axes[0][1]
        names = sorted({k for r in evals for k in r["eval"]})
        for name in names:
            pts = [(r["step"], r["eval"][name]) for r in evals if name in r["eval"]]
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax2.set_xlabel("step")
        ax2.set_title("evaluation")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
