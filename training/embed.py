"""Stage embed: every kept pair's image and caption through a local open_clip checkpoint.

Output in the stage folder, in clip-retrieval's ``clip_inference`` layout (pipeline/embeddings.py):
``img_emb/``, ``text_emb/`` (float16, L2-normalised), ``metadata/`` (uid, row, url, caption,
cosine), one part per crawl tar, plus ``manifest.json`` (architecture, checkpoint + sha256,
preprocess, dim). kept.parquet = every input column + ``clip_score`` (the cosine of the pair's
own image and text embedding) + ``clip_score_raw`` (the same cosine; with ``bootstrap`` the
out-of-fold cosine, and clip_score its rank within the fold). Images that cannot be read drop
as ``unreadable_image``.

Resumable per tar: finished parts live in the work folder (``10_embed.work/parts``; a part is
finished once its metadata file exists) under a manifest of the embedder and the input, so a
killed run redoes only unfinished tars and a changed checkpoint never reuses old parts. The
stage folder gets hard links to them. Nothing is downloaded: checkpoints are local files
(``training.model.load_embedding_model`` reads the release formats and says what does not fit).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from dedup.imagestore import KEY_COL, TAR_COL, ImageStore
from pipeline import embeddings
from pipeline.config import BuildConfig
from pipeline.progress import progress
from pipeline.stage import StageContext, StageError, StageSpec
from training.model import load_embedding_model

BOOTSTRAP = "bootstrap"
WORK_VERSION = 1  # bump when a change here changes what a finished part holds


# -- the embedder ----------------------------------------------------------------------------
@dataclass
class Embedder:
    """An open_clip model in eval mode with its own eval preprocess and tokenizer."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: torch.device
    precision: str
    info: dict[str, Any] = field(default_factory=dict)  # what manifest.json records

    def _autocast(self) -> contextlib.AbstractContextManager:
        return (torch.autocast(self.device.type, dtype=torch.bfloat16)
                if self.precision == "bf16" else contextlib.nullcontext())

    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        """L2-normalised float32 embeddings of preprocessed images, as open_clip's
        ``encode_image(normalize=True)``."""
        with torch.inference_mode(), self._autocast():
            out = self.model.encode_image(images.to(self.device), normalize=True)
        return out.float().cpu().numpy()

    def encode_texts(self, captions: list[str]) -> np.ndarray:
        """L2-normalised float32 embeddings of captions (``encode_text(normalize=True)``)."""
        tokens = self.tokenizer(captions)
        with torch.inference_mode(), self._autocast():
            out = self.model.encode_text(tokens.to(self.device), normalize=True)
        return out.float().cpu().numpy()

    def encode(self, images: torch.Tensor, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(image, text) embeddings of a batch of pairs."""
        return self.encode_images(images), self.encode_texts(captions)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("embed.device: cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


def load_embedder(model: str, checkpoint: str | Path, device: str = "cpu",
                  precision: str = "fp32") -> Embedder:
    """An Embedder for ``model`` (an open_clip architecture name or a model config JSON path)
    with the weights of the local file ``checkpoint`` (OpenAI's TorchScript or state dict,
    open_clip's release or training checkpoints, our train/model.pt). Raises ValueError naming
    embed.model / embed.checkpoint, the file and what was expected."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"embed.precision: {precision!r} is not fp32 or bf16")
    dev = pick_device(device)
    net, preprocess, tokenizer, info = load_embedding_model(model, checkpoint)
    net.to(dev).eval()
    info.update(precision=precision, device=dev.type)
    return Embedder(net, preprocess, tokenizer, dev, precision, info)


# -- the loop ---------------------------------------------------------------------------------
@dataclass
class Embedded:
    """One part: the rows that were read (in input order) and the ones that could not be."""

    uids: list[str]
    img: np.ndarray  # float32 [n, dim], normalised
    txt: np.ndarray
    cosine: np.ndarray  # float32 [n]: each row's image . its own text
    rows: list[int]  # index into the part's input rows, per embedded row
    unreadable: list[tuple[str, str]]  # (uid, why)


def _decode(preprocess: Callable, data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return preprocess(im)


def _ordered(fn: Callable, items: Iterator[Any], workers: int,
             window: int) -> Iterator[tuple[Any, Future | Any]]:
    """(item, future of fn(item's data)) in input order, at most ``window`` in flight: image
    decoding runs on ``workers`` threads (PIL and torchvision release the GIL) while the model
    encodes the previous batch."""
    if workers <= 0:
        yield from ((it, _done(fn, it[-1])) for it in items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[tuple[Any, Future]] = deque()
        for it in items:
            pending.append((it, pool.submit(fn, it[-1])))
            if len(pending) >= window:
                yield pending.popleft()
        while pending:
            yield pending.popleft()


def _done(fn: Callable, data: bytes) -> Future:
    f: Future = Future()
    try:
        f.set_result(fn(data))
    except BaseException as e:  # handed to the caller as a future's exception
        f.set_exception(e)
    return f


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _why(e: BaseException) -> str:
    # PIL names the BytesIO it read ("<_io.BytesIO object at 0x7f..>"): an address per run
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
    return f"{type(e).__name__}: {text}"[:300]


def embed_rows(emb: Embedder, rows: list[tuple[str, str, str, str]], batch_size: int,
               workers: int, bar: Any = None) -> Embedded:
    """Embed (uid, tar path, member key, caption) rows; an image that is missing or does not
    decode is listed in ``unreadable`` with the reason."""
    unreadable: list[tuple[str, str]] = []
    uids: list[str] = []
    index: list[int] = []
    imgs: list[np.ndarray] = []
    txts: list[np.ndarray] = []
    batch: list[tuple[int, str, torch.Tensor, str]] = []

    def flush() -> None:
        if batch:
            i, t = emb.encode(torch.stack([b[2] for b in batch]), [b[3] for b in batch])
            imgs.append(i)
            txts.append(t)
            uids.extend(b[1] for b in batch)
            index.extend(b[0] for b in batch)
            if bar is not None:
                bar.update(len(batch))
            batch.clear()

    def read(store: ImageStore) -> Iterator[tuple[int, str, str, bytes]]:
        for i, (uid, tar, key, caption) in enumerate(rows):
            try:
                data, _ = store.get(tar, key)
            except (KeyError, ValueError, OSError) as e:
                unreadable.append((uid, str(e)[:300]))
                if bar is not None:
                    bar.update(1)
                continue
            yield i, uid, caption or "", data

    with ImageStore() as store:
        decode = functools.partial(_decode, emb.preprocess)
        for (i, uid, caption, _), fut in _ordered(decode, read(store), workers,
                                                  window=max(2 * batch_size, 4 * workers)):
            try:
                batch.append((i, uid, fut.result(), caption))
            except _DECODE_ERRORS as e:
                unreadable.append((uid, _why(e)))
                if bar is not None:
                    bar.update(1)
                continue
            if len(batch) >= batch_size:
                flush()
        flush()
    dim = int(emb.info.get("dim", 0))
    img = np.concatenate(imgs) if imgs else np.zeros((0, dim), np.float32)
    txt = np.concatenate(txts) if txts else np.zeros((0, dim), np.float32)
    return Embedded(uids, img, txt, (img * txt).sum(axis=1).astype(np.float32), index,
                    unreadable)


# -- parts in the work folder ------------------------------------------------------------------
Row = tuple[str, str, str, str]  # uid, absolute tar path, key, caption


def parts_of(cfg: BuildConfig, table: pa.Table) -> tuple[list[str], list[list[Row]], list]:
    """(sorted crawl tars, the rows of each, rows without a tar) — part i is tars[i]."""
    cols = table.column_names
    for c in ("uid", "caption", TAR_COL, KEY_COL):
        if c not in cols:
            raise StageError(f"embed: the input has no {c!r} column (the crawl's tar/key locate "
                             "each image)")
    by_tar: dict[str, list[Row]] = {}
    no_tar: list[tuple[str, str]] = []
    for uid, cap, tar, key in zip(*(table.column(c).to_pylist()
                                    for c in ("uid", "caption", TAR_COL, KEY_COL)), strict=True):
        if tar is None or key is None:
            no_tar.append((uid, "no crawl tar/key for this row"))
        else:
            by_tar.setdefault(tar, []).append((uid, str(cfg.run_dir / tar), key, cap))
    tars = sorted(by_tar)
    for t in tars:
        if not os.path.isfile(cfg.run_dir / t):
            raise StageError(f"embed: crawl tar not found: {cfg.run_dir / t} "
                             f"({len(by_tar[t])} rows point at it); rerun the crawl")
    return tars, [sorted(by_tar[t], key=lambda r: r[2]) for t in tars], no_tar


def rows_fingerprint(rows: list[Row]) -> str:
    h = hashlib.sha256()
    for uid, _, key, cap in rows:
        h.update(f"{uid}\0{key}\0{cap}\0".encode())
    for tar in sorted({r[1] for r in rows}):
        st = os.stat(tar)
        h.update(f"{tar}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _open_work(folder: Path, manifest: dict[str, Any]) -> None:
    """Keep the finished parts of ``folder`` only if they were made by the same embedder from
    the same rows; otherwise start it afresh."""
    path = folder / "work.json"
    manifest = json.loads(json.dumps(manifest, default=str))  # as the file holds it
    if path.is_file() and json.loads(path.read_text()) == manifest:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True))


def embed_parts(emb: Embedder, parts: list[list[Row]], folder: Path, batch_size: int,
                workers: int, inputs: str, urls: dict[str, str] | None = None) -> dict[str, Any]:
    """Embed every part not yet finished in ``folder``; returns counts. A part's unreadable
    rows are written before its metadata, so a finished part is complete."""
    _open_work(folder, {"embedder": {k: v for k, v in emb.info.items() if k != "seconds"},
                        "inputs": inputs, "version": WORK_VERSION, "tars": len(parts)})
    done = set(embeddings.finished_parts(folder))
    todo = [p for p in range(len(parts)) if p not in done]
    bar = progress(total=sum(len(parts[p]) for p in todo), desc="embed", unit="img",
                   leave=False)
    for p in todo:
        bar.set_postfix(part=f"{p + 1}/{len(parts)}")
        e = embed_rows(emb, parts[p], batch_size, workers, bar)
        bad = folder / "unreadable" / f"unreadable_{embeddings.part_name(p)}.parquet"
        bad.parent.mkdir(exist_ok=True)
        pq.write_table(pa.table({"uid": pa.array([u for u, _ in e.unreadable], pa.string()),
                                 "detail": pa.array([d for _, d in e.unreadable], pa.string())}),
                       bad)
        embeddings.write_part(folder, p, e.uids, e.img, e.txt, {
            "url": pa.array([(urls or {}).get(u) for u in e.uids], pa.string()),
            "caption": pa.array([parts[p][i][3] for i in e.rows], pa.string()),
            "cosine": pa.array(e.cosine, pa.float32())})
    bar.close()
    return {"parts": len(parts), "parts_reused": len(done & set(range(len(parts)))),
            "images_embedded": sum(len(parts[p]) for p in todo)}


def read_unreadable(folder: Path) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for f in sorted((folder / "unreadable").glob("unreadable_*.parquet")):
        t = pq.read_table(f)
        out += list(zip(t.column("uid").to_pylist(), t.column("detail").to_pylist(), strict=True))
    return out


def read_cosines(folder: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in embeddings.finished_parts(folder):
        t = pq.read_table(folder / embeddings.META / f"metadata_{embeddings.part_name(p)}.parquet",
                          columns=["uid", "cosine"])
        out.update(zip(t.column("uid").to_pylist(), t.column("cosine").to_pylist(), strict=True))
    return out


def link_parts(src: Path, dst: Path) -> None:
    """The finished parts of ``src`` into ``dst`` as hard links (a copy across file systems)."""
    for sub in (embeddings.IMG, embeddings.TXT, embeddings.META):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / sub).glob(f"{sub}_*")):
            if ".tmp-" in f.name:
                continue
            try:
                os.link(f, dst / sub / f.name)
            except OSError:
                shutil.copy2(f, dst / sub / f.name)


# -- the stage ---------------------------------------------------------------------------------
def _file_stat(p: Path) -> dict[str, Any]:
    try:
        st = p.stat()
    except OSError:
        return {"path": str(p), "missing": True}
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint_inputs(cfg: BuildConfig, spec: StageSpec) -> dict[str, Any]:
    """The checkpoint file (and a model config JSON) by size and mtime: a new file of the same
    name reruns the stage. With bootstrap, the truth table (it only changes the report)."""
    e = cfg.embed
    out: dict[str, Any] = {}
    if e.model.endswith(".json"):
        out["model_config"] = _file_stat(cfg.resolve(e.model))
    if e.checkpoint == BOOTSTRAP:
        from pipeline.truth_report import truth_path

        out["truth"] = _file_stat(truth_path(cfg))
        if e.bootstrap.models_from:
            from training.bootstrap import donor_models

            try:
                out["fold_models"] = [_file_stat(p) for p in donor_models(cfg)]
            except ValueError:  # the stage itself says which model is missing
                out["fold_models"] = {"missing": e.bootstrap.models_from}
    elif e.checkpoint:
        out["checkpoint"] = _file_stat(cfg.resolve(e.checkpoint))
    return out


def _model_arg(cfg: BuildConfig) -> str:
    m = cfg.embed.model
    return str(cfg.resolve(m)) if m.endswith(".json") else m


def quantiles(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {}
    qs = np.quantile(values, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
    names = ["min", "p05", "p25", "p50", "p75", "p95", "max"]
    return {n: round(float(q), 4) for n, q in zip(names, qs, strict=True)} | {
        "mean": round(float(np.mean(values)), 4)}


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, e = ctx.cfg, ctx.cfg.embed
    table = pq.read_table(ctx.input_path)
    tars, parts, no_tar = parts_of(cfg, table)
    inputs = rows_fingerprint([r for p in parts for r in p])
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    urls = (dict(zip(table.column("uid").to_pylist(), table.column("url").to_pylist(),
                     strict=True)) if "url" in table.column_names else None)
    folder = ctx.work_dir / "parts"
    extra: dict[str, Any] = {}
    if e.checkpoint == BOOTSTRAP:
        from training.bootstrap import bootstrap_scores

        boot = bootstrap_scores(ctx, table, parts, inputs, urls)
        emb, scores, raw, counts = boot.embedder, boot.scores, boot.raw, boot.counts
        extra["bootstrap"] = boot.report
    else:
        try:
            emb = load_embedder(_model_arg(cfg), cfg.resolve(e.checkpoint), e.device,
                                e.precision)
        except ValueError as err:
            raise StageError(f"embed ({cfg.path}): {err}") from err
        counts = embed_parts(emb, parts, folder, e.batch_size, e.workers, inputs, urls)
        scores = raw = read_cosines(folder)
    unreadable = no_tar + read_unreadable(folder)

    link_parts(folder, ctx.out_dir)
    manifest = {**emb.info, "parts": {embeddings.part_name(i): t for i, t in enumerate(tars)},
                "rows": len(scores), "dtype": "float16", "normalised": True,
                "keyed_by": "uid", "layout": "clip-retrieval clip_inference"}
    if e.checkpoint == BOOTSTRAP:
        manifest["checkpoint"], manifest["embeddings_checkpoint"] = BOOTSTRAP, emb.info[
            "checkpoint"]
        manifest["embeddings_from"] = extra["bootstrap"]["embeddings_from"]
    (ctx.out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    _write_outputs(ctx, table, scores, raw, unreadable)
    score = np.array(list(scores.values()), np.float64)
    extra.update(counts, unreadable=len(unreadable), dim=emb.info.get("dim"),
                 architecture=emb.info.get("architecture"),
                 checkpoint=manifest.get("checkpoint"),
                 clip_score=quantiles(score), clip_score_raw=quantiles(
                     np.array(list(raw.values()), np.float64)))
    return extra


def _write_outputs(ctx: StageContext, table: pa.Table, scores: dict[str, float],
                   raw: dict[str, float], unreadable: list[tuple[str, str]]) -> None:
    keep = [c for c in table.column_names if c not in ("clip_score", "clip_score_raw")]
    uids = list(scores)
    con = ctx.connect()
    con.register("src", table.select(keep))
    con.register("scored", pa.table({
        "uid": pa.array(uids, pa.string()),
        "clip_score": pa.array([scores[u] for u in uids], pa.float64()),
        "clip_score_raw": pa.array([raw[u] for u in uids], pa.float64())}))
    con.execute(f"COPY (SELECT src.*, s.clip_score, s.clip_score_raw FROM src JOIN scored s "
                f"USING (uid) ORDER BY uid) TO '{ctx.kept_path}' (FORMAT parquet)")
    con.register("bad", pa.table({"uid": pa.array([u for u, _ in unreadable], pa.string()),
                                  "detail": pa.array([d for _, d in unreadable], pa.string())}))
    con.execute(f"COPY (SELECT uid, '{ctx.spec.name}' AS stage, 'unreadable_image' AS reason, "
                f"detail FROM bad ORDER BY uid) TO '{ctx.dropped_path}' (FORMAT parquet)")
    con.close()
