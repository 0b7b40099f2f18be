"""The end of `make demo`: train the same recipe on the raw crawl and on the curated shards,
at equal samples seen, and evaluate both against chance on the held-out sets.

This is the product's reason to exist, measured, whichever way it goes: the table is
printed and written to runs/<build>/eval/summary.md (+ .json).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from pipeline import shard
from pipeline.config import BuildConfig
from pipeline.stage import (
    StageContext,
    StageError,
    fingerprint_of,
    get_spec,
    kept_of,
    read_report,
    stage_dir,
    stage_inputs,
)
from training.evaluate import retrieval, zero_shot
from training.model import load_for_inference
from training.options import PRECISIONS, TrainOptions, options_from_build
from training.train import train


def raw_crawl_shards(cfg: BuildConfig) -> tuple[Path, str]:
    """Every image the crawl downloaded, uncurated, as shards written by the shard stage's own
    writer with the build's seed; returns (folder, fingerprint).

    Training on the crawl's tars directly would make the baseline depend on the order in which
    img2dataset's threads finished (and on how many attempts the crawl took), so the raw column
    moved from one fresh crawl to the next. Through the same writer and global shuffle as the
    curated run, curation is the only difference between the two columns.
    """
    crawl = read_report(stage_dir(cfg, get_spec("crawl")))
    if crawl is None:
        raise StageError("the crawl stage has not finished: run `witforge crawl` first")
    raw_cfg = dataclasses.replace(cfg, shard=dataclasses.replace(cfg.shard, upsample=1))
    spec = get_spec("shard")
    # the shard stage's own fingerprint on the crawl's output: its settings and its code
    fp = fingerprint_of(stage_inputs(raw_cfg, spec, crawl["fingerprint"]))
    out = cfg.run_dir / "raw_crawl_shards"
    if (out / "fingerprint").is_file() and (out / "fingerprint").read_text() == fp:
        return out, fp
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ctx = StageContext(cfg=raw_cfg, spec=spec, out_dir=tmp, input_path=kept_of(cfg, "crawl"),
                       work_dir=tmp, options={})
    shard.run(ctx)
    (tmp / "fingerprint").write_text(fp)
    shutil.rmtree(out, ignore_errors=True)  # a half-written folder is never renamed into place
    tmp.rename(out)
    return out, fp


def options_for(cfg: BuildConfig, data: list[str], out: Path) -> TrainOptions:
    """The build's training recipe on other data; evaluation happens after, for both runs."""
    o = options_from_build(cfg)
    o.precision = PRECISIONS[o.precision]
    o.train_data, o.out, o.zeroshot, o.retrieval = data, str(out), [], []
    return o


def _train_once(o: TrainOptions, data_fingerprint: str) -> dict[str, Any]:
    """Train unless the same options on the same data already produced a final model."""
    out = Path(o.out)
    summary, opts, data = out / "summary.json", out / "options.json", out / "data_fingerprint"
    if (summary.exists() and opts.exists() and (out / "model.pt").exists()
            and data.exists() and data.read_text() == data_fingerprint
            and json.loads(opts.read_text()) == json.loads(json.dumps(o.to_dict()))):
        print(f"[train] {out} up to date, skipped")
        return json.loads(summary.read_text())
    if o.threads > 0:  # oversubscribed torch threads run several times slower on 2 cores
        import torch

        torch.set_num_threads(o.threads)
    result = train(o)
    data.write_text(data_fingerprint)
    return result


def _evaluate(cfg: BuildConfig, model_path: Path, out: Path) -> list[dict[str, Any]]:
    net, preprocess, tokenizer = load_for_inference(cfg.train.model, model_path)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for d in cfg.eval.zeroshot:
        r = zero_shot(net, preprocess, tokenizer, cfg.resolve(d), cfg.eval.templates)
        results.append(r)
    for d in cfg.eval.retrieval:
        results.append(retrieval(net, preprocess, tokenizer, cfg.resolve(d)))
    for r in results:
        (out / f"{r['dataset']}_{r['task']}.json").write_text(json.dumps(r, indent=1))
    return results


def _rows(results: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    names = list(results)
    for i, r in enumerate(results[names[0]]):
        if r["task"] == "zeroshot_classification":
            metric, chance = "top-1", f"{r['chance_top1']:.3f}"
            vals = [results[n][i]["top1"] for n in names]
        else:
            metric, chance = "i2t R@1", f"{r['chance_R1']:.3f}"
            vals = [results[n][i]["image_to_text_R@1"] for n in names]
        rows.append((r["dataset"], metric, chance, *[f"{v:.3f}" for v in vals]))
        if r["task"] == "zeroshot_retrieval":
            vals = [results[n][i]["text_to_image_R@5"] for n in names]
            rows.append((r["dataset"], "t2i R@5", f"{min(1.0, 5 * r['chance_R1']):.3f}",
                         *[f"{v:.3f}" for v in vals]))
    return rows


def train_and_evaluate(cfg: BuildConfig, data_dir: Path | None = None) -> dict[str, Any]:
    """Curated vs raw at equal samples seen; returns and writes the comparison."""
    raw, raw_fp = raw_crawl_shards(cfg)
    shards = stage_dir(cfg, get_spec("shard"))
    curated_report = read_report(shards)
    # each run's data and its fingerprint, which says when to train again
    runs = {
        "curated": ([str(shards)], curated_report["fingerprint"] if curated_report else ""),
        "raw_crawl": ([str(raw)], raw_fp),
    }
    results: dict[str, list[dict[str, Any]]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    for name, (data, fp) in runs.items():
        out = cfg.run_dir / ("train" if name == "curated" else f"train_{name}")
        print(f"\n[train] {name}: {cfg.train.model}, {cfg.train.steps} steps x batch "
              f"{cfg.train.batch_size} on {data[0]}", file=sys.stderr)
        summaries[name] = _train_once(options_for(cfg, data, out), fp)
        results[name] = _evaluate(cfg, out / "model.pt", cfg.run_dir / "eval" / name)
    header = ("eval set", "metric", "chance", *runs)
    rows = _rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    seen = {n: s.get("steps", 0) * s.get("global_batch", 0) for n, s in summaries.items()}
    lines.append("")
    lines.append("samples seen: " + ", ".join(f"{n} {v:,}" for n, v in seen.items())
                 + f"; model {cfg.train.model}")
    table = "\n".join(lines)
    out = cfg.run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(table + "\n")
    payload = {"results": results, "train": summaries, "samples_seen": seen}
    (out / "summary.json").write_text(json.dumps(payload, indent=1, default=str))
    print("\nEvaluation: the same recipe on the raw crawl vs the curated shards")
    print(table)
    print(f"(written to {out / 'summary.md'}; curves in {cfg.run_dir / 'train' / 'curves.png'})")
    return payload
