"""One build's embeddings as a searchable index: faiss, the ledger's verdict per row, thumbnails.

``SearchIndex.open(cfg)`` reads the embed stage's folder (pipeline/embeddings.py's layout)
into two exact ``faiss.IndexFlatIP`` (image and text embeddings; rows are L2-normalised, so the
inner product is the cosine) and joins every row to the ledger (pages/sql/search_rows.sql):
kept by the last finished stage, or dropped by a later stage (clip_filter, semantic_dedup,
balance, shard) with its reason and detail. A row's faiss id is its row in the embed folder,
as clip-retrieval's ids are rows of its metadata files.

Queries are encoded with the embedder the manifest names (same architecture and checkpoint,
the checkpoint's sha256 checked), so a query and the stored rows share one embedding space.
"""

from __future__ import annotations

import base64
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from dedup.imagestore import ImageStore
from pipeline import embeddings
from pipeline.config import BuildConfig
from pipeline.stage import StageError, connect, enabled_stages, read_report, stage_dir

_SQL = Path(__file__).parent / "sql"
EMBED = "embed"
# clip-retrieval's back end drops a result whose embedding has a cosine above this to a
# better-ranked result (its connected-components dedup on the results)
DEDUP_THRESHOLD = 0.94
MAX_RESULT_IDS = 10_000
THUMB_SIDE = 256
_COLUMNS = ("caption", "url", "source", "tar", "key", "width", "height", "clip_score")
_FILTERS = ("status", "stage", "reason", "source")


class QueryError(ValueError):
    """A query the index cannot answer (bad input, unknown filter value): a 400, not a 500."""


@dataclass
class Facet:
    codes: np.ndarray  # int32 per row, -1 = null
    values: list[str]


def _facet(col: pa.ChunkedArray) -> Facet:
    enc = pc.dictionary_encode(col.combine_chunks())
    codes = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False).astype(np.int32)
    return Facet(codes, [str(v) for v in enc.dictionary.to_pylist()])


def _finished_after_embed(cfg: BuildConfig) -> list[tuple[str, Path]]:
    """(folder name, path) of embed and the finished stages after it, up to the first gap."""
    specs = enabled_stages(cfg)
    names = [s.name for s in specs]
    if EMBED not in names:
        raise StageError(f"{cfg.path}: the build has no embed stage (set embed.checkpoint): "
                         "search needs the embed stage's embeddings")
    out = []
    for spec in specs[names.index(EMBED):]:
        folder = stage_dir(cfg, spec)
        if read_report(folder) is None:
            break
        out.append((spec.folder, folder))
    if not out:
        raise StageError(f"{stage_dir(cfg, specs[names.index(EMBED)])} is not finished: run "
                         f"`witforge embed --build {cfg.path}` first")
    return out


def _normalised_embedded(path: Path) -> pa.Table:
    """The embed stage's kept rows with the columns the page shows (null where a build's
    rows lack one, e.g. no source column)."""
    t = pq.read_table(path)
    n = t.num_rows
    types = {"width": pa.int64(), "height": pa.int64(), "clip_score": pa.float64()}
    cols = {"uid": t.column("uid")}
    for c in _COLUMNS:
        typ = types.get(c, pa.string())
        cols[c] = t.column(c).cast(typ) if c in t.column_names else pa.nulls(n, typ)
    return pa.table(cols)


def _dropped(folder: str, path: Path | None) -> pa.Table:
    """A stage's ledger as strings (an empty stage's columns may be typed null), with the
    stage's folder name; ``path=None``: no rows."""
    cols = ("uid", "stage", "reason", "detail")
    t = (pq.read_table(path / "dropped.parquet", columns=list(cols)) if path is not None
         else pa.table({c: pa.array([], pa.string()) for c in cols}))
    out = {c: t.column(c).cast(pa.string()) for c in cols}
    return pa.table({**out, "stage_folder": pa.array([folder] * t.num_rows, pa.string())})


def _checkpoint_of(manifest: dict[str, Any]) -> str:
    ckpt = manifest.get("checkpoint") or ""
    # bootstrap's stored embeddings are fold 0's model's: queries must use that one
    return manifest.get("embeddings_checkpoint") or ckpt if ckpt == "bootstrap" else ckpt


class SearchIndex:
    """Exact search over one build's embed stage, with the ledger's verdict on every row."""

    def __init__(self, name: str, cfg: BuildConfig, rows: pa.Table, emb: embeddings.Embeddings,
                 stages: list[str], complete: bool, embedder: Any) -> None:
        self.name, self.cfg = name, cfg
        self.run_dir = cfg.run_dir.resolve()
        self.rows = rows
        self.uids = emb.uids
        self.row_of = {u: i for i, u in enumerate(emb.uids)}
        self.manifest = emb.manifest
        self.dim = int(emb.img.shape[1])
        self.stages, self.complete = stages, complete
        self.embedder = embedder
        self.indices = {}
        for modality, x in (("image", emb.img), ("text", emb.txt)):
            index = faiss.IndexFlatIP(self.dim)
            index.add(np.ascontiguousarray(x, dtype=np.float32))
            self.indices[modality] = index
        self.facets = {f: _facet(rows.column(f)) for f in _FILTERS}
        self._encode_lock = threading.Lock()
        self._store_lock = threading.Lock()
        self._store = ImageStore(max_open=32)
        self._thumbs: OrderedDict[str, bytes] = OrderedDict()

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def open(cls, cfg: BuildConfig, device: str = "cpu", name: str | None = None,
             load_model: bool = True) -> SearchIndex:
        chain = _finished_after_embed(cfg)
        embed_dir = chain[0][1]
        emb = embeddings.load(embed_dir)
        con = connect(cfg)
        con.register("emb_rows", pa.table({"uid": pa.array(list(emb.uids), pa.string()),
                                           "row": pa.array(range(len(emb.uids)), pa.int64())}))
        con.register("embedded", _normalised_embedded(embed_dir / "kept.parquet"))
        dropped = [_dropped(f, d) for f, d in chain[1:]]
        con.register("later_dropped", pa.concat_tables(dropped) if dropped else _dropped("", None))
        con.register("final_kept", pq.read_table(chain[-1][1] / "kept.parquet", columns=["uid"]))
        rows = con.sql((_SQL / "search_rows.sql").read_text()).to_arrow_table()
        con.close()
        later = [s.folder for s in enabled_stages(cfg)]
        complete = later[-1] == chain[-1][0]
        embedder = cls.load_embedder(emb.manifest, device) if load_model else None
        return cls(name or cfg.name, cfg, rows, emb, [f for f, _ in chain], complete, embedder)

    @staticmethod
    def load_embedder(manifest: dict[str, Any], device: str = "cpu") -> Any:
        """The embed stage's own model (training.embed.load_embedder), refusing a checkpoint
        file that changed since the embeddings were written."""
        from training.embed import load_embedder
        from training.model import file_sha256

        arch, ckpt = manifest.get("architecture"), _checkpoint_of(manifest)
        if not arch or not ckpt:
            raise StageError("the embed stage's manifest.json names no architecture/checkpoint")
        want = manifest.get("checkpoint_sha256")
        if want and Path(ckpt).is_file() and file_sha256(Path(ckpt)) != want:
            raise StageError(f"{ckpt} changed since the embeddings were written (sha256 differs "
                             "from manifest.json): rerun the embed stage, or queries would be "
                             "encoded by another model than the stored rows")
        try:
            return load_embedder(arch, ckpt, device, manifest.get("precision", "fp32"))
        except ValueError as e:
            raise StageError(f"search: cannot load the embed stage's model: {e}") from e

    # -- queries ------------------------------------------------------------------------------
    def encode_text(self, text: str) -> np.ndarray:
        e = self._require_embedder()
        with self._encode_lock:
            return e.encode_texts([text])

    def encode_image(self, data: bytes) -> np.ndarray:
        e = self._require_embedder()
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                x = e.preprocess(im).unsqueeze(0)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise QueryError(f"image: not a readable image ({type(err).__name__}: {err})") from None
        with self._encode_lock:
            return e.encode_images(x)

    def stored(self, uid: str, modality: str = "image") -> np.ndarray:
        row = self.row_of.get(uid)
        if row is None:
            raise QueryError(f"uid {uid!r} has no embedding in build {self.name}")
        return self.indices[modality].reconstruct(row).reshape(1, -1)

    def _require_embedder(self) -> Any:
        if self.embedder is None:
            raise QueryError("this server was started without a model: only embedding_input "
                             "and uid queries work")
        return self.embedder

    def mask(self, filters: dict[str, str | None]) -> np.ndarray | None:
        """Rows passing every filter (None: no filter set). Unknown keys or values are errors
        that list what exists."""
        out = None
        for key, value in filters.items():
            if value in (None, "", "all"):
                continue
            if key not in self.facets:
                raise QueryError(f"filter {key!r}: unknown (filters: {', '.join(_FILTERS)})")
            facet = self.facets[key]
            if value not in facet.values:
                known = ", ".join(sorted(facet.values)) or "none"
                raise QueryError(f"filter {key}={value!r}: no row has it (values: {known})")
            m = facet.codes == facet.values.index(value)
            out = m if out is None else out & m
        return out

    def search(self, query: np.ndarray, modality: str, k: int, mask: np.ndarray | None = None,
               deduplicate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(ids, similarities) of the ``k`` nearest rows of the ``modality`` index, exact,
        restricted to ``mask``; with ``deduplicate``, as clip-retrieval's back end, a result
        whose cosine to a better-ranked one is above 0.94 is left out."""
        if modality not in self.indices:
            raise QueryError(f"modality {modality!r}: must be 'image' or 'text'")
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if query.shape[1] != self.dim:
            raise QueryError(f"the query has {query.shape[1]} dimensions, the index {self.dim}")
        index = self.indices[modality]
        allowed = index.ntotal if mask is None else int(mask.sum())
        k = min(int(k), MAX_RESULT_IDS, allowed)
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        params = None
        if mask is not None:
            bits = np.packbits(mask, bitorder="little")  # must outlive the search
            params = faiss.SearchParameters(sel=faiss.IDSelectorBitmap(len(mask),
                                                                        faiss.swig_ptr(bits)))
        sims, ids = index.search(query, k, params=params)
        keep = ids[0] >= 0
        ids, sims = ids[0][keep], sims[0][keep]
        if deduplicate and len(ids) > 1:
            drop = near_duplicates(index.reconstruct_batch(ids), DEDUP_THRESHOLD)
            ids, sims = np.delete(ids, drop), np.delete(sims, drop)
        return ids, sims

    def metadata(self, ids: np.ndarray | list[int]) -> list[dict[str, Any]]:
        """Each row's columns as the page and the API show them."""
        out = self.rows.take(pa.array(np.asarray(ids, np.int64))).to_pylist()
        for r in out:
            r.pop("row", None)
            r.pop("tar", None)
            r.pop("key", None)
        return out

    # -- images -------------------------------------------------------------------------------
    def thumbnail(self, uid: str) -> bytes:
        """A JPEG of the row's stored image, at most 256 px a side; KeyError if the uid is not
        in the index, PermissionError if its tar lies outside the build."""
        with self._store_lock:
            cached = self._thumbs.get(uid)
            if cached is not None:
                self._thumbs.move_to_end(uid)
                return cached
        row = self.row_of[uid]
        tar, key = self.rows.column("tar")[row].as_py(), self.rows.column("key")[row].as_py()
        if tar is None or key is None:
            raise KeyError(uid)
        path = inside(self.run_dir, tar)
        with self._store_lock:
            data, _ = self._store.get(str(path), key)
        jpeg = to_jpeg(data, THUMB_SIDE)
        with self._store_lock:
            self._thumbs[uid] = jpeg
            if len(self._thumbs) > 4096:
                self._thumbs.popitem(last=False)
        return jpeg

    def image_base64(self, uid: str) -> str | None:
        try:
            return base64.b64encode(self.thumbnail(uid)).decode("ascii")
        except (KeyError, PermissionError, OSError, ValueError):
            return None

    def info(self) -> dict[str, Any]:
        """What the page's filters offer and what the index holds."""
        status = self.facets["status"]
        counts = {v: int((status.codes == i).sum()) for i, v in enumerate(status.values)}
        by_reason = (self.rows.filter(pc.equal(self.rows.column("status"), "dropped"))
                     .group_by(["stage_folder", "stage", "reason"])
                     .aggregate([("uid", "count")]).to_pylist())
        by_reason.sort(key=lambda r: (r["stage_folder"], -r["uid_count"], r["reason"]))
        sources = self.rows.group_by("source").aggregate([("uid", "count")]).to_pylist()
        m = self.manifest
        return {"name": self.name, "rows": len(self.uids), "dim": self.dim, "status": counts,
                "reasons": [{"stage": r["stage"], "stage_folder": r["stage_folder"],
                             "reason": r["reason"], "count": r["uid_count"]} for r in by_reason],
                "sources": sorted(({"source": r["source"], "count": r["uid_count"]}
                                   for r in sources if r["source"] is not None),
                                  key=lambda r: -r["count"]),
                "stages": self.stages, "complete": self.complete,
                "model": {"architecture": m.get("architecture"),
                          "checkpoint": _checkpoint_of(m),
                          "checkpoint_sha256": m.get("checkpoint_sha256")},
                "has_model": self.embedder is not None,
                "card": (self.run_dir / "card" / "index.html").is_file()}

    def close(self) -> None:
        with self._store_lock:
            self._store.close()



def near_duplicates(x: np.ndarray, threshold: float) -> list[int]:
    """Positions to drop so that each connected component of the graph 'cosine > threshold'
    keeps only its first (best-ranked) member — clip-retrieval's result dedup."""
    x = embeddings.normalise(x)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, _, nbrs = index.range_search(x, threshold)
    parent = list(range(len(x)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(x)):
        for j in nbrs[lims[i]:lims[i + 1]]:
            a, b = root(i), root(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)  # the root stays the best-ranked member
    return [i for i in range(len(x)) if root(i) != i]


def inside(root: Path, relative: str) -> Path:
    """``root / relative`` resolved (symlinks followed); PermissionError unless it stays in
    ``root``. Absolute paths, ``..`` and links out are all refused the same way."""
    if "\0" in relative:
        raise PermissionError(relative)
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise PermissionError(f"{relative}: outside {root}")
    return path


def to_jpeg(data: bytes, side: int) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        im.thumbnail((side, side))
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            flat = Image.new("RGB", im.size, (255, 255, 255))
            flat.paste(im, mask=im.getchannel("A"))
            im = flat
        elif im.mode != "RGB":
            im = im.convert("RGB")
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        return buf.getvalue()
