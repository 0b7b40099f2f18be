"""The card's figures: PNG files written beside index.html by matplotlib (Agg, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 100
COLORS = {"ingested": "#8c8c8c", "crawled": "#8c8c8c", "kept": "#1f77b4"}


def hist_pair(values: dict[str, np.ndarray], xlabel: str, out: Path,
              clip: float | None = None) -> str | None:
    """Two overlaid histograms (before in grey, after in blue) with shared bins."""
    if not any(len(v) for v in values.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=DPI)
    _hists(ax, values, clip)
    clipped = clip is not None and any(len(v) and np.max(v) > clip for v in values.values())
    ax.set_xlabel(xlabel + (f" (>{clip:g} shown at {clip:g})" if clipped else ""))
    ax.set_ylabel("pairs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out.name


def _hists(ax: plt.Axes, values: dict[str, np.ndarray], clip: float | None,
           log: bool = False) -> None:
    arrays = {k: np.asarray(v, float) if clip is None else np.minimum(np.asarray(v, float), clip)
              for k, v in values.items() if len(v)}
    lo = min(float(a.min()) for a in arrays.values())
    hi = max(float(a.max()) for a in arrays.values())
    if log:
        lo = max(lo, 1.0)
        bins = np.geomspace(lo, max(hi, lo * 1.01), 30)
        ax.set_xscale("log")
    else:
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 30)
    for label, a in arrays.items():
        ax.hist(a, bins=bins, alpha=0.55, label=f"{label} ({len(a):,})", color=COLORS.get(label))


def image_hists(data: dict[str, dict[str, np.ndarray]], out: Path) -> str | None:
    """Shorter side, aspect ratio and stored bytes: the crawled images against the kept ones."""
    if not any(len(d["side"]) for d in data.values()):
        return None
    panels = (("side", "shorter side (px, original)", False, None),
              ("aspect", "aspect ratio (long / short)", False, 6.0),
              ("bytes", "bytes (as stored by the crawl)", True, None))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), dpi=DPI)
    for ax, (key, label, log, clip) in zip(axes, panels, strict=True):
        vals = {k: d[key] for k, d in data.items() if len(d[key])}
        if vals:
            _hists(ax, vals, clip, log=log)
            ax.legend(fontsize=8)
        ax.set_xlabel(label)
    axes[0].set_ylabel("images")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out.name
