"""``embed.checkpoint: bootstrap`` — a CLIP score from the pool itself, out of fold.

K-fold (``embed.bootstrap.folds``, default 3): a pair's fold is a hash of (uid, seed), so it
does not depend on order or partitioning. For each fold k, the shard stage's own writer puts
the pairs of the *other* folds into WebDataset shards and ``training.train`` trains
``embed.bootstrap.model`` on them; that model then scores fold k's pairs, which it never saw.
``clip_score_raw`` is that out-of-fold cosine; ``clip_score`` is its rank within the fold,
rank / (n - 1) in [0, 1], so folds whose models differ in scale still compare.

The stored embeddings (img_emb/text_emb) of every pair come from fold 0's model: one
embedding space for semantic dedup and search (fold 0's model saw folds 1..K-1, which does not
matter there; the manifest says so).

What it can catch: pairs whose caption does not describe the image as the rest of the pool
would (swapped or unrelated captions). What it cannot: noise the pool shares widely (a
boilerplate caption on many images looks normal to a model trained on that pool), and rows
the text rules already catch better (product codes, file names, boilerplate).

``embed.bootstrap.models_from`` (a finished build's run folder) scores with that build's K fold
models instead of training new ones. A pair in fold k is still out of fold: fold k's model
trained only on the other build's pairs of the other folds, and the fold is the same hash of
the uid. ``witforge compare`` uses it for ablation arms, whose rows differ from the build's
before the embed stage: the arm's CLIP filter then changes with its data, not with a scorer
trained on different data (and the arm trains no models).

Work folder ``10_embed.work/bootstrap/fold_<k>/``: ``inputs.json`` (what the fold depends on),
``shards/`` (with ``index.parquet``: the uids the fold's model trained on), ``train/`` (the
model, resumed from its step checkpoints after a kill) and ``scored.parquet`` (uid, cosine:
the pairs it scored). A fold whose inputs match is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import shard
from pipeline.config import BuildConfig
from pipeline.stage import StageContext, get_spec
from pipeline.truth_report import truth_path
from training.embed import (
    Embedder,
    Row,
    embed_parts,
    embed_rows,
    load_embedder,
    read_cosines,
    rows_fingerprint,
)
from training.options import TrainOptions
from training.train import train

LOADER_WORKERS = 2
CLEAN = "clean"  # the truth table's kind for a pair without injected noise
FOLD_VERSION = 1


@dataclass
class BootstrapResult:
    embedder: Embedder  # fold 0's model: the stored embeddings
    scores: dict[str, float]  # uid -> rank within its fold, [0, 1]
    raw: dict[str, float]  # uid -> out-of-fold cosine
    counts: dict[str, Any]  # embed_parts' counts for the stored embeddings
    report: dict[str, Any]


def fold_of(uid: str, seed: int, folds: int) -> int:
    h = hashlib.sha256(f"{seed}:bootstrap-fold:{uid}".encode()).hexdigest()
    return int(h[:16], 16) % folds


def rank_normalise(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share one) scaled to [0, 1]; a single value is 0.5."""
    n = len(values)
    if n == 0:
        return np.zeros(0)
    if n == 1:
        return np.full(1, 0.5)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(n)
    ranks[order] = np.arange(n, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    if (counts > 1).any():  # ties: each gets the mean of the ranks they span
        ranks = np.bincount(inverse, weights=ranks)[inverse] / counts[inverse]
    return ranks / (n - 1)


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """P(a positive scores above a negative), ties counted half (Mann-Whitney U / n+ n-)."""
    if not len(positive) or not len(negative):
        return None
    both = np.concatenate([positive, negative]).astype(np.float64)
    ranks = rank_normalise(both) * (len(both) - 1) + 1  # average ranks, 1-based
    u = ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(positive) * len(negative)))


def truth_for(cfg: BuildConfig) -> dict[str, str] | None:
    """The build's ground truth, uid -> kind (``clean`` or the noise injected), or None when
    it has none. The hook: ``runs/<build>/truth.parquet`` with columns uid, kind."""
    path = truth_path(cfg)
    if not path.is_file():
        return None
    t = pq.read_table(path, columns=["uid", "kind"])
    return dict(zip(t.column("uid").to_pylist(), t.column("kind").to_pylist(), strict=True))


def auc_by_kind(scores: dict[str, float], truth: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per noise kind: how well the score ranks clean pairs above that kind's pairs."""
    by_kind: dict[str, list[float]] = {}
    for uid, kind in truth.items():
        if uid in scores:
            by_kind.setdefault(kind or CLEAN, []).append(scores[uid])
    clean = np.array(by_kind.get(CLEAN, []))
    out = {}
    for kind, vals in sorted(by_kind.items()):
        if kind != CLEAN:
            auc = roc_auc(clean, np.array(vals))
            out[kind] = {"n": len(vals), "clean": len(clean),
                         "auc": round(auc, 4) if auc is not None else None}
    return out


def _fold_inputs(cfg: BuildConfig, k: int, train_rows: list[Row]) -> dict[str, Any]:
    b = cfg.embed.bootstrap
    return {"version": FOLD_VERSION, "fold": k, "folds": b.folds, "model": b.model,
            "steps": b.steps, "batch_size": b.batch_size, "lr": b.lr, "warmup": b.warmup,
            "seed": b.seed, "loader_workers": LOADER_WORKERS,
            "samples_per_shard": cfg.shard.samples_per_shard,
            "train_rows": rows_fingerprint(train_rows)}


def _train_fold(ctx: StageContext, table: pa.Table, k: int, train_uids: list[str],
                train_rows: list[Row]) -> tuple[Path, dict[str, Any]]:
    """Train fold k's model on the other folds' pairs (reused when its inputs match)."""
    cfg, b = ctx.cfg, ctx.cfg.embed.bootstrap
    folder = ctx.work_dir / "bootstrap" / f"fold_{k}"
    inputs = _fold_inputs(cfg, k, train_rows)
    marker = folder / "inputs.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == inputs):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        marker.write_text(json.dumps(inputs, indent=1))
    shards, out = folder / "shards", folder / "train"
    model = out / "model.pt"
    info: dict[str, Any] = {"fold": k, "train_rows": len(train_uids), "reused": model.is_file()}
    if model.is_file():
        summary = json.loads((out / "summary.json").read_text())
        info.update(train_seconds=summary.get("seconds"), final_loss=summary.get("final_loss"))
        return model, info
    if not (shards / "_SUCCESS").is_file():
        shutil.rmtree(shards, ignore_errors=True)
        shards.mkdir()
        src = folder / "train_rows.parquet"
        pq.write_table(table.filter(pc.is_in(table.column("uid"),
                                             pa.array(train_uids, pa.string()))), src)
        scfg = dataclasses.replace(cfg, shard=dataclasses.replace(cfg.shard, upsample=1,
                                                                  seed=b.seed))
        shard.run(StageContext(cfg=scfg, spec=get_spec("shard"), out_dir=shards,
                               input_path=src, work_dir=shards, options={}))
        src.unlink()
        (shards / "_SUCCESS").write_text("")
    o = TrainOptions(train_data=[str(shards)], out=str(out), model=b.model,
                     batch_size=b.batch_size, steps=b.steps, lr=b.lr, warmup=b.warmup,
                     seed=b.seed, workers=LOADER_WORKERS, save_every=50, keep=1,
                     resume="latest")
    t0 = time.time()
    summary = train(o)
    summary["seconds"] = round(time.time() - t0, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    info.update(train_seconds=summary["seconds"], final_loss=summary.get("final_loss"))
    return model, info


def donor_models(cfg: BuildConfig) -> list[Path]:
    """The fold models of ``embed.bootstrap.models_from`` (a run folder, relative to the
    working directory like runs_dir), one per fold; a clear error when one is missing."""
    b = cfg.embed.bootstrap
    root = Path(b.models_from).expanduser()
    root = root if root.is_absolute() else Path.cwd() / root
    work = root / f"{get_spec('embed').folder}.work" / "bootstrap"
    paths = [work / f"fold_{k}" / "train" / "model.pt" for k in range(b.folds)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"{cfg.path}: embed.bootstrap.models_from: {root} has no fold model "
                         f"{missing[0]} (run that build's embed stage with the same "
                         f"embed.bootstrap.folds first)")
    return paths


def _scored(folder: Path, inputs: dict[str, Any]) -> dict[str, float] | None:
    path = folder / "scored.parquet"
    if not path.is_file():
        return None
    t = pq.read_table(path)
    if json.loads((t.schema.metadata or {}).get(b"inputs", b"null")) != inputs:
        return None
    return dict(zip(t.column("uid").to_pylist(), t.column("cosine").to_pylist(), strict=True))


def _write_scored(folder: Path, inputs: dict[str, Any], cos: dict[str, float]) -> None:
    t = pa.table({"uid": pa.array(list(cos), pa.string()),
                  "cosine": pa.array(list(cos.values()), pa.float32())})
    t = t.replace_schema_metadata({"inputs": json.dumps(inputs)})
    tmp = folder / "scored.parquet.tmp"
    pq.write_table(t, tmp)
    tmp.replace(folder / "scored.parquet")


def bootstrap_scores(ctx: StageContext, table: pa.Table, parts: list[list[Row]], inputs: str,
                     urls: dict[str, str] | None = None) -> BootstrapResult:
    """Train the K fold models, embed every part with fold 0's, score each fold with its own
    out-of-fold model; see the module docstring."""
    cfg, e, b = ctx.cfg, ctx.cfg.embed, ctx.cfg.embed.bootstrap
    rows = [r for p in parts for r in p]
    fold = {r[0]: fold_of(r[0], b.seed, b.folds) for r in rows}
    models, report_folds = [], []
    donors = donor_models(cfg) if b.models_from else []
    for k in range(b.folds):
        if donors:
            models.append(donors[k])
            report_folds.append({"fold": k, "models_from": str(donors[k])})
            continue
        train_rows = [r for r in rows if fold[r[0]] != k]
        path, info = _train_fold(ctx, table, k, [r[0] for r in train_rows], train_rows)
        models.append(path)
        report_folds.append(info)

    emb0 = load_embedder(b.model, models[0], e.device, e.precision)
    counts = embed_parts(emb0, parts, ctx.work_dir / "parts", e.batch_size, e.workers, inputs,
                         urls)
    readable = read_cosines(ctx.work_dir / "parts")
    raw: dict[str, float] = {}
    scores: dict[str, float] = {}
    for k in range(b.folds):
        folder = ctx.work_dir / "bootstrap" / f"fold_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        mine = [r for r in rows if fold[r[0]] == k and r[0] in readable]
        key = {"model_sha256": "", "rows": rows_fingerprint(mine)}
        if k == 0:  # fold 0's model already embedded everything
            cos = {r[0]: readable[r[0]] for r in mine}
        else:
            emb = load_embedder(b.model, models[k], e.device, e.precision)
            key["model_sha256"] = emb.info["checkpoint_sha256"]
            cos = _scored(folder, key)
            if cos is None:
                got = embed_rows(emb, mine, e.batch_size, e.workers)
                cos = dict(zip(got.uids, got.cosine.tolist(), strict=True))
        _write_scored(folder, key, cos)
        uids = list(cos)
        vals = np.array([cos[u] for u in uids], np.float64)
        raw.update(zip(uids, vals.tolist(), strict=True))
        scores.update(zip(uids, rank_normalise(vals).tolist(), strict=True))
        report_folds[k]["scored"] = len(uids)
    report: dict[str, Any] = {
        "folds": report_folds, "model": b.model, "steps": b.steps,
        "embeddings_from": f"fold 0's model ({models[0]}), trained on folds 1..{b.folds - 1}",
    }
    if donors:
        report["models_from"] = b.models_from
    truth = truth_for(cfg)
    if truth is not None:
        report["truth"] = str(truth_path(cfg))
        report["auc_by_kind"] = auc_by_kind(scores, truth)
        report["auc_by_kind_raw"] = auc_by_kind(raw, truth)
    return BootstrapResult(emb0, scores, raw, counts, report)
