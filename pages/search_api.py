"""The JSON API, as clip-retrieval's back end (clip_back.py) answers it, over SearchIndex.

``POST /knn-service`` takes clip-retrieval's request — ``text``, ``image`` (base64),
``image_url``, ``embedding_input``, ``modality`` ('image' | 'text': which index to search),
``num_images``, ``num_result_ids``, ``indice_name``, ``use_mclip``, ``deduplicate``,
``use_safety_model``, ``use_violence_detector``, ``aesthetic_score``, ``aesthetic_weight`` — and
returns its list of ``{id, similarity, <metadata columns>}``: the first ``num_images`` results
carry the metadata (caption, url, image as base64 JPEG, and the ledger's uid, status, stage,
reason, detail, source, clip_score), the rest of the ``num_result_ids`` only id and
similarity, as clip_back's map_to_metadata does. ``POST /metadata`` ({ids, indice_name}) and
``GET|POST /indices-list`` as there too.

Differences, each because this server is offline and local: ``image_url`` is refused (the
server fetches nothing from the network: send the image as base64); there is no multilingual
model, safety model, violence detector or aesthetic embedding here, so those fields are
accepted and change nothing (as clip_back without them loaded). Additions that clip-retrieval's
clients never send: ``uid`` (search by a row's stored image embedding), ``filter`` ({status,
stage, reason, source}: exact search restricted to those rows), ``columns`` (which metadata
columns to return).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

from pages.search_index import QueryError, SearchIndex

# clip_back's columns_to_return default is url, image_path (sent as base64 'image'), caption
DEFAULT_COLUMNS = ("caption", "url", "image", "uid", "status", "stage", "stage_folder",
                   "reason", "detail", "source", "clip_score", "width", "height")
COLUMNS = frozenset(DEFAULT_COLUMNS)


class Indices:
    """The indices a server holds, by name (one per build)."""

    def __init__(self, indices: list[SearchIndex], columns: tuple[str, ...] = DEFAULT_COLUMNS
                 ) -> None:
        self.by_name: dict[str, SearchIndex] = {}
        for ix in indices:
            if ix.name in self.by_name:
                raise ValueError(f"two builds are named {ix.name!r}: index names must differ")
            self.by_name[ix.name] = ix
        self.columns = check_columns(columns)

    def names(self) -> list[str]:
        return list(self.by_name)

    def get(self, name: Any) -> SearchIndex:
        if name in (None, ""):  # clip_back: the first index when none is named
            return next(iter(self.by_name.values()))
        if not isinstance(name, str) or name not in self.by_name:
            raise QueryError(f"indice_name {name!r}: unknown (indices: "
                             f"{', '.join(self.by_name)})")
        return self.by_name[name]


def check_columns(columns: Any) -> tuple[str, ...]:
    if not isinstance(columns, (list, tuple)) or not all(isinstance(c, str) for c in columns):
        raise QueryError("columns: must be a list of column names")
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise QueryError(f"columns: unknown {', '.join(unknown)} (columns: "
                         f"{', '.join(DEFAULT_COLUMNS)})")
    return tuple(columns)


def _int(body: dict[str, Any], key: str, default: int, low: int = 0) -> int:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise QueryError(f"{key}: must be a number, got {value!r}")
    try:
        n = int(value)
    except ValueError:
        raise QueryError(f"{key}: must be a number, got {value!r}") from None
    if n < low:
        raise QueryError(f"{key}: must be at least {low}, got {n}")
    return n


def query_vector(ix: SearchIndex, body: dict[str, Any]) -> np.ndarray:
    """The query embedding, in clip_back's order of precedence: text, image, image_url,
    embedding_input (then ours: uid)."""
    text, image = body.get("text"), body.get("image")
    if text is not None and text != "":
        if not isinstance(text, str):
            raise QueryError("text: must be a string")
        return ix.encode_text(text)
    if image is not None and image != "":
        if not isinstance(image, str):
            raise QueryError("image: must be a base64 string")
        if image.startswith("data:") and "," in image:  # a data URL, as browsers read files
            image = image.split(",", 1)[1]
        try:
            data = base64.b64decode(image, validate=False)
        except (binascii.Error, ValueError) as e:
            raise QueryError(f"image: not base64 ({e})") from None
        return ix.encode_image(data)
    if body.get("image_url"):
        raise QueryError("image_url: this server fetches nothing from the network; send the "
                         "image itself as base64 in 'image'")
    emb = body.get("embedding_input")
    if emb is not None:
        try:
            q = np.asarray(emb, dtype=np.float32).reshape(1, -1)
        except (TypeError, ValueError):
            raise QueryError("embedding_input: must be a list of numbers") from None
        if not np.isfinite(q).all():
            raise QueryError("embedding_input: must be finite numbers")
        return q  # as clip_back: used as given (not normalised)
    uid = body.get("uid")
    if uid:
        return ix.stored(str(uid), "image")
    raise QueryError("must fill one of text, image and image url input (or embedding_input, "
                     "uid)")


def knn(indices: Indices, body: Any) -> list[dict[str, Any]]:
    """The /knn-service answer for one request body (a parsed JSON object)."""
    if not isinstance(body, dict):
        raise QueryError("the request body must be a JSON object")
    ix = indices.get(body.get("indice_name"))
    modality = body.get("modality", "image")
    num_images = _int(body, "num_images", 40)
    num_result_ids = _int(body, "num_result_ids", num_images)
    filters = body.get("filter") or {}
    if not isinstance(filters, dict):
        raise QueryError("filter: must be an object such as {\"status\": \"dropped\"}")
    columns = check_columns(body["columns"]) if "columns" in body else indices.columns
    mask = ix.mask(filters)
    query = query_vector(ix, body)
    ids, sims = ix.search(query, modality, max(num_result_ids, num_images), mask,
                          bool(body.get("deduplicate", False)))
    head = ids[:num_images]
    metas = ix.metadata(head)
    results: list[dict[str, Any]] = []
    for pos, (i, s) in enumerate(zip(ids.tolist(), sims.tolist(), strict=True)):
        out: dict[str, Any] = {}
        if pos < len(head):
            meta = metas[pos]
            for c in columns:
                if c == "image":
                    img = ix.image_base64(meta["uid"])
                    if img is not None:
                        out["image"] = img
                elif meta.get(c) is not None:  # clip_back leaves out what a row lacks
                    out[c] = meta[c]
        out["id"] = int(i)
        out["similarity"] = float(s)
        results.append(out)
    return results


def metadata(indices: Indices, body: Any) -> list[dict[str, Any]]:
    """/metadata: {ids, indice_name} -> [{id, metadata}], as clip_back's MetadataService."""
    if not isinstance(body, dict) or not isinstance(body.get("ids"), list):
        raise QueryError("the request body must be {\"ids\": [...], \"indice_name\": ...}")
    ix = indices.get(body.get("indice_name"))
    ids = body["ids"]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(ix.uids)
               for i in ids):
        raise QueryError(f"ids: must be row numbers from 0 to {len(ix.uids) - 1}")
    if not ids:
        return []
    out = []
    for i, meta in zip(ids, ix.metadata(ids), strict=True):
        m = {c: meta[c] for c in indices.columns if c != "image" and meta.get(c) is not None}
        if "image" in indices.columns:
            img = ix.image_base64(meta["uid"])
            if img is not None:
                m["image"] = img
        out.append({"id": i, "metadata": m})
    return out
