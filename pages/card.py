"""`witforge card --build B`: a self-contained HTML data card of a build.

Writes runs/<build>/card/index.html with its figures (PNG) beside it and thumbnails in
card/thumbs/; it opens from file:// with no network (no scripts, no CDN, nothing fetched).
Sections: snapshot, funnel, dropped pairs by stage and reason (duplicate clusters beside their
kept image, decontamination hits beside the eval image), kept samples, captions / images /
crawl errors / sources, balance, training and evaluation, and the scale projection
(runs/<build>/plan.json). What a build has not produced yet is skipped with a note.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from pages import card_stats
from pages.card_data import LedgerView, finished_stages
from pages.card_html import render
from pages.thumbs import Thumbs
from pipeline.config import BuildConfig, load_build
from pipeline.stage import StageError, connect

SAMPLES = 12  # dropped pairs shown per reason
CLUSTERS = 4  # duplicate clusters shown per dedup reason
KEPT = 24  # random kept pairs
ATYPICAL = 8  # pairs per atypical grid


def write_card(cfg: BuildConfig, out: Path | None = None, samples: int = SAMPLES,
               clusters: int = CLUSTERS, kept: int = KEPT, atypical: int = ATYPICAL,
               log: Callable[[str], None] = print) -> Path:
    """Write the card folder (atomically: a temporary folder renamed into place)."""
    t0 = time.time()
    stages = finished_stages(cfg)
    if not stages:
        raise StageError(f"build {cfg.name} has no finished stage in {cfg.run_dir}: run "
                         f"`witforge run --build {cfg.path}` first")
    out = out or cfg.run_dir / "card"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        thumbs = Thumbs(tmp / "thumbs", cfg.run_dir)
        lv = LedgerView(cfg, connect(cfg), stages, thumbs)
        data = {
            "snap": lv.snapshot(), "funnel": lv.funnel(),
            "drops": lv.reasons(samples, clusters), "kept": lv.kept_samples(kept, atypical),
            "captions": card_stats.captions(lv, tmp), "images": card_stats.images(lv, tmp),
            "crawl_errors": card_stats.crawl_errors(lv), "sources": card_stats.sources(lv),
            "balance": card_stats.balance(lv, tmp), "training": card_stats.training(lv, tmp),
            "plan": card_stats.plan(lv),
        }
        n_thumbs = thumbs.write()
        (tmp / "index.html").write_text(render(data, thumbs), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    page = out / "index.html"
    log(f"card: {page} ({n_thumbs} thumbnails, {len(thumbs.failed)} unreadable; "
        f"{time.time() - t0:.1f}s); open {page.resolve().as_uri()}")
    return page


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="witforge card", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", required=True, help="the build YAML, e.g. manifests/demo.yaml")
    p.add_argument("--out", type=Path, help="the card folder (default runs/<build>/card)")
    p.add_argument("--samples", type=int, default=SAMPLES,
                   help=f"dropped pairs shown per stage and reason, and per duplicate cluster "
                   f"(default {SAMPLES})")
    p.add_argument("--clusters", type=int, default=CLUSTERS,
                   help=f"duplicate clusters shown per dedup reason (default {CLUSTERS})")
    p.add_argument("--kept", type=int, default=KEPT,
                   help=f"pairs in the random kept grid (default {KEPT})")
    p.add_argument("--atypical", type=int, default=ATYPICAL,
                   help=f"pairs in each atypical kept grid (default {ATYPICAL})")
    args = p.parse_args(argv)
    for flag in ("samples", "clusters", "kept", "atypical"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag} must be 0 or more")
    write_card(load_build(args.build), args.out, args.samples, args.clusters, args.kept,
               args.atypical)
    return 0
