"""The embed stage's output on disk, laid out as clip-retrieval's ``clip_inference`` writes it.

    <embed stage>/img_emb/img_emb_{part}.npy          float16 [n, dim], L2-normalised rows
    <embed stage>/text_emb/text_emb_{part}.npy        float16 [n, dim], L2-normalised rows
    <embed stage>/metadata/metadata_{part}.parquet    uid, row (its row in the part), url, caption
    <embed stage>/manifest.json                       model, checkpoint + sha256, preprocess, dim

so autofaiss and clip-retrieval's index tools read it; rows are keyed by **uid**, never by file
name. ``part`` is a zero-padded number (``0000``): the files sort in part order. One part per
crawl tar, so the stage resumes tar by tar. Readers (semantic dedup, the search page, the card)
go through :func:`load` and never parse the layout themselves.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

IMG, TXT, META = "img_emb", "text_emb", "metadata"


def part_name(part: int) -> str:
    return f"{part:04d}"


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def write_part(folder: Path, part: int, uids: list[str], img: np.ndarray, txt: np.ndarray,
               meta: dict[str, list[Any]] | None = None) -> None:
    """Write one part (float16, rows L2-normalised here). The metadata file is written last:
    a part counts as finished only once its metadata exists."""
    if not (len(uids) == len(img) == len(txt)):
        raise ValueError(f"part {part}: {len(uids)} uids, {len(img)} image and {len(txt)} "
                         "text embeddings")
    for sub in (IMG, TXT, META):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    name = part_name(part)
    _atomic_save(folder / IMG / f"{IMG}_{name}.npy", normalise(img).astype(np.float16))
    _atomic_save(folder / TXT / f"{TXT}_{name}.npy", normalise(txt).astype(np.float16))
    cols: dict[str, Any] = {"uid": pa.array(uids, pa.string()),
                            "row": pa.array(range(len(uids)), pa.int32())}
    for k, v in (meta or {}).items():
        cols[k] = v
    path = folder / META / f"{META}_{name}.parquet"
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    pq.write_table(pa.table(cols), tmp)
    os.replace(tmp, path)


def finished_parts(folder: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[-1]) for p in (folder / META).glob(f"{META}_*.parquet"))


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


@dataclass
class Embeddings:
    uids: np.ndarray  # object array of str, row order of img/txt
    img: np.ndarray  # float32 [n, dim]
    txt: np.ndarray  # float32 [n, dim]
    manifest: dict[str, Any]

    def rows_of(self, uids: list[str] | np.ndarray) -> np.ndarray:
        """Row indices of ``uids``; raises naming the first uid without an embedding."""
        index = {u: i for i, u in enumerate(self.uids)}
        out = np.empty(len(uids), dtype=np.int64)
        for j, u in enumerate(uids):
            i = index.get(u)
            if i is None:
                raise KeyError(f"uid {u} has no embedding in this embed stage")
            out[j] = i
        return out


def load(folder: Path, uids: list[str] | None = None) -> Embeddings:
    """Every finished part of ``folder`` (an embed stage folder), as float32; with ``uids``,
    just those rows in that order."""
    parts = finished_parts(folder)
    if not parts:
        raise FileNotFoundError(f"{folder}: no embeddings ({META}/{META}_*.parquet)")
    all_uids, imgs, txts = [], [], []
    for part in parts:
        name = part_name(part)
        all_uids.extend(pq.read_table(folder / META / f"{META}_{name}.parquet",
                                      columns=["uid"]).column("uid").to_pylist())
        imgs.append(np.load(folder / IMG / f"{IMG}_{name}.npy"))
        txts.append(np.load(folder / TXT / f"{TXT}_{name}.npy"))
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    e = Embeddings(np.array(all_uids, dtype=object), np.concatenate(imgs).astype(np.float32),
                   np.concatenate(txts).astype(np.float32), manifest)
    if uids is not None:
        rows = e.rows_of(uids)
        e = Embeddings(e.uids[rows], e.img[rows], e.txt[rows], manifest)
    return e
