"""The end of `make demo`: the build's recipe trained on the truly raw crawl and on the curated
shards, at equal samples seen, one seed, scored on the held-out sets against chance.

This is `witforge compare` with two arms and one seed (training/compare.py): ``raw`` is every
ingested row crawled and sharded with nothing curated (pipeline/arms.py), ``curated`` the
build. One seed is not evidence — the seed spread at this size is as large as the gaps — so the
table says so, and `make experiment` runs the seeded comparison with the ablations. Written to
runs/<build>/eval/summary.md (+ .json); the models stay in runs/<build>/train and train_raw.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import BuildConfig
from training.compare import markdown, run_compare

NOTE = ("One seed is not evidence: at this size two seeds of the same data differ by as much as "
        "the columns here. The seeded comparison with ablations is `make experiment` "
        "(runs/{build}/compare/compare.md).")


def train_and_evaluate(cfg: BuildConfig, data_dir: Path | None = None) -> dict[str, Any]:
    """Raw vs curated, one seed; returns and writes the comparison."""
    out = cfg.run_dir / "eval"
    where = {"curated": cfg.run_dir / "train", "raw": cfg.run_dir / "train_raw"}
    payload = run_compare(cfg, ["curated", "raw"], [cfg.train.seed], out,
                          train_dir=lambda arm, seed: where[arm])
    table = markdown(payload["summary"], payload["chance"],
                     f"samples seen: {payload['samples_seen']:,} per arm; model "
                     f"{payload['model']}.\n" + NOTE.format(build=cfg.name))
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(payload, indent=1, default=str))
    print("\nEvaluation: the same recipe on the raw crawl vs the curated shards")
    print(table)
    print(f"(written to {out / 'summary.md'}; curves in {cfg.run_dir / 'train' / 'curves.png'})")
    return payload
