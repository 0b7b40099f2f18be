"""`witforge compare`: does the curation pay? raw vs curated vs ablations, at equal compute, seeds.

Every arm (``pipeline/arms.py``: ``raw`` = every ingested row crawled and sharded, nothing
curated; ``curated`` = the build; ``no_<step>`` = the build with one step off) trains the build's
recipe (train:) for the same steps x batch — equal samples seen, whatever the arm's size — once
per seed. A seed seeds the training and the shard shuffle (the shards are written again with
that seed); the data stages are deterministic, so they run once per arm. Each model is scored on
every eval set: zero-shot classification (the sets' templates), retrieval R@1/5/10 both ways,
and a linear probe where a set has a train/ split. Out: runs/<build>/compare/compare.json|md and
compare.png (mean ± std per arm and metric, each arm's sample count, and each arm's paired
difference to raw per seed).

    witforge compare --build manifests/demo.yaml [--seeds 3] [--ablate all | STEP ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import BuildConfig
from pipeline.stage import (
    StageContext,
    fingerprint_of,
    get_spec,
    read_report,
    stage_dir,
    stage_inputs,
)
from training.options import PRECISIONS, TrainOptions, options_from_build

# The figures the report leads with: retrieval both ways and the probe (at this scale the
# category top-1 of ~200 images moves by +-0.03 between seeds of the same data).
HEADLINE = ("t2i_R@5", "i2t_R@5", "probe_top1", "zeroshot_top1")


def shards_for(cfg: BuildConfig, seed: int, kept: Path | None = None,
               out: Path | None = None) -> tuple[Path, str]:
    """The build's shards written with shard seed ``seed`` (its own shard stage's folder when
    that is its seed): (folder, fingerprint). ``kept`` shards another stage's rows instead."""
    spec = get_spec("shard")
    report = read_report(stage_dir(cfg, spec))
    if kept is None and report is not None and seed == cfg.shard.seed:
        return stage_dir(cfg, spec), report["fingerprint"]
    from pipeline import shard

    upstream = kept.parent if kept is not None else Path(report["input"]).parent
    up = read_report(upstream)
    if up is None:
        raise ValueError(f"{upstream} has not finished: run the build first")
    c = dataclasses.replace(cfg, shard=dataclasses.replace(cfg.shard, seed=seed, upsample=1))
    fp = fingerprint_of(stage_inputs(c, spec, up["fingerprint"]))
    out = out or cfg.run_dir / "compare" / "shards" / f"seed{seed}"
    if (out / "fingerprint").is_file() and (out / "fingerprint").read_text() == fp:
        return out, fp
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ctx = StageContext(cfg=c, spec=spec, out_dir=tmp, input_path=upstream / "kept.parquet",
                       work_dir=tmp, options={})
    shard.run(ctx)
    (tmp / "fingerprint").write_text(fp)
    shutil.rmtree(out, ignore_errors=True)  # a half-written folder is never renamed into place
    tmp.rename(out)
    return out, fp


def recipe(cfg: BuildConfig, data: Path, out: Path, seed: int) -> TrainOptions:
    """The build's training recipe on ``data``; evaluation runs afterwards, for every arm."""
    o = options_from_build(cfg)
    o.precision = PRECISIONS[o.precision]
    o.train_data, o.out, o.zeroshot, o.retrieval, o.seed = [str(data)], str(out), [], [], seed
    return o


def train_once(o: TrainOptions, data_fingerprint: str) -> dict[str, Any]:
    """Train unless the same options on the same data already produced a final model."""
    from training.train import train

    out = Path(o.out)
    summary, opts, data = out / "summary.json", out / "options.json", out / "data_fingerprint"
    if (summary.exists() and opts.exists() and (out / "model.pt").exists()
            and data.exists() and data.read_text() == data_fingerprint
            and json.loads(opts.read_text()) == json.loads(json.dumps(o.to_dict()))):
        print(f"[train] {out} up to date, skipped", file=sys.stderr)
        return json.loads(summary.read_text())
    if o.threads > 0:  # oversubscribed torch threads run several times slower on 2 cores
        import torch

        torch.set_num_threads(o.threads)
    result = train(o)
    data.write_text(data_fingerprint)
    return result


def evaluate_model(cfg: BuildConfig, model_path: Path, out: Path) -> dict[str, float]:
    """Every eval set of the build, flat: {"<set>/<metric>": value}; one JSON per set and task
    in ``out``."""
    from training.evaluate import retrieval, zero_shot
    from training.model import load_for_inference
    from training.probe import linear_probe

    net, preprocess, tokenizer = load_for_inference(cfg.train.model, model_path)
    out.mkdir(parents=True, exist_ok=True)
    scores: dict[str, float] = {}
    results = []
    for d in map(cfg.resolve, cfg.eval.zeroshot):
        r = zero_shot(net, preprocess, tokenizer, d, cfg.eval.templates)
        scores[f"{d.name}/zeroshot_top1"] = r["top1"]
        scores[f"{d.name}/chance_top1"] = r["chance_top1"]
        results.append(r)
        if (d / "train").is_dir():
            p = linear_probe(net, preprocess, d)
            scores[f"{d.name}/probe_top1"] = p["top1"]
            results.append(p)
    for d in map(cfg.resolve, cfg.eval.retrieval):
        r = retrieval(net, preprocess, tokenizer, d)
        for k in (1, 5, 10):
            scores[f"{d.name}/i2t_R@{k}"] = r[f"image_to_text_R@{k}"]
            scores[f"{d.name}/t2i_R@{k}"] = r[f"text_to_image_R@{k}"]
        scores[f"{d.name}/chance_R@1"] = r["chance_R1"]
        results.append(r)
    for r in results:
        (out / f"{r['dataset']}_{r['task']}.json").write_text(json.dumps(r, indent=1))
    return scores


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(runs: dict[str, dict[int, dict[str, float]]], samples: dict[str, int],
              base: str = "raw") -> dict[str, Any]:
    """Mean ± std per arm and metric; each arm against ``base``, paired by seed: the mean of
    the per-seed differences and z = that mean / the seed spread (the pooled std of the two
    arms' seeds); |z| > 2 is the bar the issue sets."""
    metrics = sorted({m for per in runs.values() for s in per.values() for m in s
                      if "chance" not in m})
    table: dict[str, dict[str, Any]] = {}
    for arm, per in runs.items():
        seeds = sorted(per)
        row: dict[str, Any] = {"samples": samples.get(arm), "seeds": seeds}
        for m in metrics:
            vals = [per[s][m] for s in seeds if m in per[s]]
            if not vals:
                continue
            mean, std = _mean_std(vals)
            row[m] = {"mean": mean, "std": std, "values": vals}
            if base in runs and arm != base:
                paired = [per[s][m] - runs[base][s][m] for s in seeds
                          if s in runs[base] and m in runs[base][s]]
                if paired:
                    spread = ((std ** 2 + _mean_std([runs[base][s][m] for s in seeds
                                                    if s in runs[base]])[1] ** 2) / 2) ** 0.5
                    d_mean, d_std = _mean_std(paired)
                    row[m]["vs_" + base] = {"diff_mean": d_mean, "diff_std": d_std,
                                            "per_seed": paired,
                                            "z": d_mean / spread if spread > 0 else None}
        table[arm] = row
    return {"metrics": metrics, "arms": table, "base": base}


def markdown(summary: dict[str, Any], chance: dict[str, float], note: str = "") -> str:
    """The comparison as a Markdown table: one row per metric, one column per arm."""
    arms = list(summary["arms"])
    lines = ["| metric | chance | " + " | ".join(arms) + " |",
             "|---|---|" + "---|" * len(arms)]
    for m in summary["metrics"]:
        cells = []
        for a in arms:
            v = summary["arms"][a].get(m)
            if v is None:
                cells.append("")
                continue
            cell = f"{v['mean']:.3f} ± {v['std']:.3f}" if len(v["values"]) > 1 else \
                f"{v['mean']:.3f}"
            vs = v.get("vs_" + summary["base"])
            if vs and vs["z"] is not None and len(v["values"]) > 1:
                cell += f" ({vs['diff_mean']:+.3f}, z {vs['z']:+.1f})"
            cells.append(cell)
        lines.append(f"| {m} | {chance.get(m, float('nan')):.3f} | " + " | ".join(cells) + " |")
    lines.append("| samples in the shards | | " + " | ".join(
        f"{summary['arms'][a]['samples']:,}" if summary["arms"][a]["samples"] else ""
        for a in arms) + " |")
    if note:
        lines += ["", note]
    return "\n".join(lines)


def _chance(scores: dict[str, float]) -> dict[str, float]:
    out = {}
    for k, v in scores.items():
        name, _, metric = k.rpartition("/")
        if metric == "chance_top1":
            out[f"{name}/zeroshot_top1"] = out[f"{name}/probe_top1"] = v
        elif metric == "chance_R@1":
            for n in (1, 5, 10):
                out[f"{name}/i2t_R@{n}"] = out[f"{name}/t2i_R@{n}"] = min(1.0, n * v)
    return out


def run_compare(cfg: BuildConfig, arms: list[str], seeds: list[int], out_dir: Path,
                train_dir=None, log=print) -> dict[str, Any]:
    """Train and evaluate every arm x seed; write compare.json/md/png into ``out_dir``.
    ``train_dir(arm, seed)`` says where a run trains (default out_dir/train/<arm>/seed<k>)."""
    from pipeline.arms import run_arm
    from pipeline.status import changes

    t0 = time.time()
    arm_cfgs: dict[str, BuildConfig] = {"curated": cfg}
    donors = [cfg]
    for arm in [a for a in arms if a != "curated"]:
        log(f"\n[compare] arm {arm}: its stages (identical ones are linked from the build)")
        arm_cfgs[arm] = run_arm(cfg, arm, donors, log=log, explain=changes)
        donors.append(arm_cfgs[arm])
    runs: dict[str, dict[int, dict[str, float]]] = {}
    samples: dict[str, int] = {}
    chance: dict[str, float] = {}
    for arm in arms:
        c = arm_cfgs[arm]
        runs[arm] = {}
        for seed in seeds:
            data, fp = shards_for(c, seed, out=(None if c is cfg else
                                                c.run_dir / "compare_shards" / f"seed{seed}"))
            samples[arm] = sum(json.loads((data / "sizes.json").read_text()).values())
            where = (train_dir(arm, seed) if train_dir else out_dir / "train" / arm
                     / f"seed{seed}")
            log(f"\n[train] {arm} seed {seed}: {cfg.train.model}, {cfg.train.steps} steps x "
                f"batch {cfg.train.batch_size} on {samples[arm]:,} samples ({data})")
            train_once(recipe(cfg, data, where, seed), fp)
            scores = evaluate_model(cfg, where / "model.pt", where / "eval")
            chance.update(_chance(scores))
            runs[arm][seed] = {k: v for k, v in scores.items() if "chance" not in k}
    summary = summarize(runs, samples, base="raw" if "raw" in runs else arms[0])
    payload = {"arms": arms, "seeds": seeds, "model": cfg.train.model,
               "steps": cfg.train.steps, "batch_size": cfg.train.batch_size,
               "samples_seen": cfg.train.steps * cfg.train.batch_size,
               "summary": summary, "chance": chance, "runs": runs,
               "seconds": round(time.time() - t0, 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(payload, indent=1))
    plot(summary, out_dir / "compare.png")
    return payload


def plot(summary: dict[str, Any], png: Path) -> Path:
    """One panel per headline metric: each arm's mean (bar), its seeds (dots), ± std."""
    from training.plot import plt

    metrics = [m for m in summary["metrics"] if m.rsplit("/", 1)[-1] in HEADLINE]
    arms = list(summary["arms"])
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(3.2 * max(1, len(metrics)), 3.6),
                             squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=False):
        for i, a in enumerate(arms):
            v = summary["arms"][a].get(m)
            if not v:
                continue
            ax.bar(i, v["mean"], yerr=v["std"], color="#4c78a8" if a != "raw" else "#aaaaaa",
                   capsize=3)
            ax.plot([i] * len(v["values"]), v["values"], "k.", ms=4)
        ax.set_xticks(range(len(arms)), arms, rotation=60, ha="right", fontsize=7)
        ax.set_title(m, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def truth_section(cfg: BuildConfig, arms: list[str]) -> str:
    """Where the build has a truth table (the demo web): what each arm's shards hold, kind by
    kind, and what each curation step of the build dropped; empty otherwise."""
    from pipeline.arms import arm_config
    from pipeline.truth_report import arms_markdown, curation_truth, markdown, truth_path

    build = curation_truth(cfg)
    if build is None:
        return ""
    reports = {a: (build if a == "curated" else curation_truth(arm_config(cfg, a),
                                                             truth_path(cfg)))
               for a in arms}
    return ("\n## What the shards hold, against the demo web's truth\n\n"
            + arms_markdown({a: r for a, r in reports.items() if r is not None})
            + "\n## Each curation step of the build, against the truth\n\n" + markdown(build))


def main(argv: list[str] | None = None) -> int:
    from pipeline.arms import ABLATIONS, ablations_of
    from pipeline.config import load_build

    p = argparse.ArgumentParser(prog="witforge compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", required=True, help="the build YAML (its stages must have run)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    p.add_argument("--ablate", nargs="*", default=[], metavar="STEP",
                   help=f"arms with one step off: all, or some of {', '.join(ABLATIONS)}")
    p.add_argument("--out", help="output folder (default runs/<build>/compare)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_build(a.build)
    ablate = ablations_of(cfg) if a.ablate == ["all"] else a.ablate
    unknown = [x for x in ablate if x not in ABLATIONS]
    if unknown or a.seeds < 1:
        p.error(f"unknown ablation {unknown[0]!r} (choose from: all, {', '.join(ABLATIONS)})"
                if unknown else "--seeds must be >= 1")
    from pipeline.demo import compare_context

    with compare_context(cfg):
        payload = run_compare(cfg, ["raw", "curated", *ablate],
                              [cfg.train.seed + i for i in range(a.seeds)],
                              Path(a.out) if a.out else cfg.run_dir / "compare")
    out = Path(a.out) if a.out else cfg.run_dir / "compare"
    md = markdown(payload["summary"], payload["chance"],
                  f"{len(payload['seeds'])} seeds per arm; every arm {payload['steps']} steps x "
                  f"batch {payload['batch_size']} = {payload['samples_seen']:,} samples seen; "
                  "(diff, z) = the paired difference to raw over seeds and its z against the "
                  "seed spread.")
    md += "\n" + truth_section(cfg, payload["arms"])
    (out / "compare.md").write_text(md + "\n")
    print(md)
    print(f"(written to {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
