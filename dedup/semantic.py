"""Stage semantic_dedup: SemDeDup (Abbas et al. 2023) on the embed stage's image embeddings.

1. Rows are put in uid order first, so the result does not depend on the input's row order.
2. Spherical k-means (faiss, seeded) groups the L2-normalised image embeddings; with fewer
   than ``semantic_dedup.exact_below`` rows everything is one cluster (exact all pairs is then
   cheaper than clustering).
3. Within a cluster, members are ordered as SemDeDup orders them: by cosine to the centroid,
   ascending (the farthest first), ties by uid. Greedy: the first member is kept; each next
   one is dropped when its cosine to an already *kept* member is ≥ 1 − eps, else kept. So every
   dropped row has a kept near-duplicate, and no two kept rows of a cluster are that close.
   (SemDeDup's reference code compares with every earlier member, kept or not; a chain a–b–c
   there drops c even when a, its only kept neighbour, is far.)
4. ``target_fraction`` instead of ``eps``: eps is found by bisection, rerunning the greedy, so
   the removed fraction is as close to the target as the data allows (the greedy's removed
   count need not grow strictly with eps).

Dropped rows: ``reason = semantic_duplicate``, ``detail = "<kept uid> cos=0.9734"`` (the kept
member it is closest to). pHash (image_dedup) stays for exact copies: CLIP-like embeddings are
poor copy detectors, this stage removes *semantic* redundancy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import embeddings
from pipeline.stage import StageContext, StageError, get_spec, stage_dir

_SQL = Path(__file__).parent / "sql"

BLOCK = 1024  # members resolved together; a block x block similarity matrix is 4 MB
MAX_CELLS = 1 << 23  # block x kept similarities computed at once (32 MB of float32)
# faiss trains on at most this many points per centroid (a seeded sample): near-duplicates
# are far closer to each other than to a cluster border, so a coarser fit loses little recall
# and the training pass no longer dominates the stage (bench/bench_semantic.py)
MAX_POINTS_PER_CENTROID = 64
EPS_TOLERANCE = 1e-5  # the bisection stops when the eps interval is this narrow


@dataclass
class Greedy:
    """Per row (in the caller's order): ``by`` = the row it duplicates (-1: kept), ``cos`` =
    its cosine to that row."""
    by: np.ndarray
    cos: np.ndarray

    @property
    def removed(self) -> int:
        return int((self.by >= 0).sum())


def greedy(x: np.ndarray, threshold: float, block: int = BLOCK,
           max_cells: int = MAX_CELLS) -> Greedy:
    """SemDeDup's greedy over rows already in cluster order (``x`` float32, normalised):
    row i is dropped when its largest cosine to an earlier kept row is ≥ ``threshold``."""
    m, d = x.shape
    thr = np.float32(threshold)
    by = np.full(m, -1, np.int64)
    cos = np.zeros(m, np.float32)
    kept_vec = np.empty((m, d), np.float32)  # contiguous, so a block multiplies it directly
    kept_row = np.empty(m, np.int64)
    nk = 0
    chunk = max(1, max_cells // block)
    for s in range(0, m, block):
        xb = x[s:s + block]
        b = len(xb)
        best = np.full(b, -np.inf, np.float32)  # closest kept row of the earlier blocks
        arg = np.full(b, -1, np.int64)
        for c in range(0, nk, chunk):
            sim = xb @ kept_vec[c:min(nk, c + chunk)].T
            j = sim.argmax(axis=1)
            v = sim[np.arange(b), j]
            better = v > best
            best[better], arg[better] = v[better], kept_row[c + j[better]]
        keep = best < thr
        inner = xb @ xb.T
        inner[np.triu_indices(b)] = -np.inf  # only earlier rows of the block count
        near = inner >= thr
        # only a row with an earlier near row in its block needs resolving in order; the rest
        # is decided already. A row's earlier rows are final when its turn comes.
        for i in np.flatnonzero(keep & near.any(axis=1)):
            if (near[i, :i] & keep[:i]).any():
                keep[i] = False
        inner[:, ~keep] = -np.inf
        j = inner.argmax(axis=1)
        v = inner[np.arange(b), j]
        drop = np.flatnonzero(~keep)
        from_block = v[drop] > best[drop]
        by[s + drop] = np.where(from_block, s + j[drop], arg[drop])
        cos[s + drop] = np.where(from_block, v[drop], best[drop])
        kept = np.flatnonzero(keep)
        kept_vec[nk:nk + len(kept)] = xb[kept]
        kept_row[nk:nk + len(kept)] = s + kept
        nk += len(kept)
    return Greedy(by, cos)


def kmeans(x: np.ndarray, k: int, iterations: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(cluster of each row, normalised centroids): faiss spherical k-means, seeded."""
    import faiss  # imported here: the stage list imports every stage module

    km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, spherical=True,
                      verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=MAX_POINTS_PER_CENTROID)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign[:, 0].astype(np.int64), embeddings.normalise(km.centroids)


@dataclass
class SemDedup:
    by: np.ndarray  # per input row: the row it duplicates, -1 when kept
    cos: np.ndarray
    eps: float
    clusters: int
    largest_cluster: int
    kmeans_seconds: float
    dedup_seconds: float
    searches: int  # greedy passes (1 with a given eps)

    @property
    def removed(self) -> int:
        return int((self.by >= 0).sum())


def cluster_order(x: np.ndarray, clusters: int, exact_below: int, iterations: int,
                  seed: int) -> tuple[list[np.ndarray], int, float]:
    """Each cluster's rows in SemDeDup's order (cosine to the centroid ascending, ties by row,
    i.e. by uid), the number of clusters and the k-means seconds."""
    n = len(x)
    started = time.time()
    if n < max(exact_below, 2):
        assign = np.zeros(n, np.int64)
        centroids = embeddings.normalise(x.mean(axis=0, keepdims=True))
        k = 1
    else:
        k = min(n, clusters or max(1, round(math.sqrt(n))))
        assign, centroids = kmeans(x, k, iterations, seed)
    seconds = time.time() - started
    to_centroid = np.einsum("ij,ij->i", x, centroids[assign])
    rows = np.arange(n)
    order = np.lexsort((rows, to_centroid, assign))  # by cluster, then cosine, then uid
    bounds = np.flatnonzero(np.diff(assign[order])) + 1
    groups = [g for g in np.split(order, bounds) if len(g)]
    return groups, k, seconds


def _pass(x: np.ndarray, groups: list[np.ndarray], eps: float) -> Greedy:
    n = len(x)
    out = Greedy(np.full(n, -1, np.int64), np.zeros(n, np.float32))
    for g in groups:
        r = greedy(x[g], 1.0 - eps)
        hit = r.by >= 0
        out.by[g[hit]] = g[r.by[hit]]
        out.cos[g[hit]] = r.cos[hit]
    return out


def semdedup(x: np.ndarray, *, eps: float = 0.0, target_fraction: float = 0.0,
             clusters: int = 0, exact_below: int = 10000, iterations: int = 20,
             seed: int = 0) -> SemDedup:
    """SemDeDup over ``x`` (float32, normalised rows, in uid order)."""
    if (eps > 0) == (target_fraction > 0):
        raise ValueError("set exactly one of eps (> 0) and target_fraction (> 0)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if n == 0:
        return SemDedup(np.zeros(0, np.int64), np.zeros(0, np.float32), eps, 0, 0, 0.0, 0.0, 0)
    groups, k, km_seconds = cluster_order(x, clusters, exact_below, iterations, seed)
    started = time.time()
    searches = 1
    if eps > 0:
        result = _pass(x, groups, eps)
    else:
        eps, result, searches = _search(x, groups, target_fraction)
    return SemDedup(result.by, result.cos, eps, k, max((len(g) for g in groups), default=0),
                    round(km_seconds, 3), round(time.time() - started, 3), searches)


def _search(x: np.ndarray, groups: list[np.ndarray],
            target_fraction: float) -> tuple[float, Greedy, int]:
    """Bisection over eps in (0, 2] (a threshold of -1 keeps one row per cluster); the eps
    whose removed count is closest to the target wins, the smaller eps on a tie."""
    goal = round(target_fraction * len(x))
    lo, hi = 0.0, 2.0
    best: tuple[int, float, Greedy] | None = None
    searches = 0
    while hi - lo > EPS_TOLERANCE:
        mid = (lo + hi) / 2
        r = _pass(x, groups, mid)
        searches += 1
        miss = abs(r.removed - goal)
        if best is None or (miss, mid) < (best[0], best[1]):
            best = (miss, mid, r)
        if r.removed == goal:
            break
        if r.removed < goal:
            lo = mid
        else:
            hi = mid
    assert best is not None
    return best[1], best[2], searches


def _image_embeddings(folder: Path, uids: list[str], input_path: Path | None) -> np.ndarray:
    try:
        e = embeddings.load(folder)
    except FileNotFoundError as err:
        raise StageError(f"stage semantic_dedup needs the embed stage's embeddings: {err}") \
            from err
    index = {u: i for i, u in enumerate(e.uids)}
    missing = [u for u in uids if u not in index]
    if missing:
        more = f" (and {len(missing) - 1:,} more)" if len(missing) > 1 else ""
        raise StageError(f"stage semantic_dedup: uid {missing[0]}{more} of {input_path} has no "
                         f"image embedding in the embed stage folder {folder}; run the embed "
                         "stage again")
    return e.img[[index[u] for u in uids]]


def _sql(name: str) -> str:
    return (_SQL / name).read_text()


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg.semantic_dedup
    con = ctx.connect()
    con.execute(f"CREATE TEMP TABLE src AS SELECT * FROM read_parquet('{ctx.input_path}')")
    uids = [r[0] for r in con.execute("SELECT uid FROM src ORDER BY uid").fetchall()]
    folder = stage_dir(ctx.cfg, get_spec("embed"))
    x = (_image_embeddings(folder, uids, ctx.input_path) if uids
         else np.zeros((0, 1), np.float32))
    r = semdedup(x, eps=cfg.eps, target_fraction=cfg.target_fraction, clusters=cfg.clusters,
                 exact_below=cfg.exact_below, iterations=cfg.kmeans_iterations, seed=cfg.seed)
    drop = np.flatnonzero(r.by >= 0)
    detail = [f"{uids[b]} cos={c:.4f}" for b, c in zip(r.by[drop], r.cos[drop], strict=True)]
    con.register("sem_drop_arrow", pa.table({
        "uid": pa.array([uids[i] for i in drop], pa.string()),
        "detail": pa.array(detail, pa.string())}))
    con.execute("CREATE TEMP TABLE sem_drop AS SELECT * FROM sem_drop_arrow")
    con.execute(f"COPY ({_sql('semantic_dropped.sql')}) TO '{ctx.dropped_path}' "
                "(FORMAT parquet)", {"stage": ctx.spec.name})
    con.execute(f"COPY ({_sql('semantic_kept.sql')}) TO '{ctx.kept_path}' (FORMAT parquet)")
    con.close()
    n = len(uids)
    return {
        "clusters": r.clusters, "exact": r.clusters == 1 and n < max(cfg.exact_below, 2),
        "eps": round(r.eps, 6), "eps_searched": cfg.target_fraction > 0,
        "target_fraction": cfg.target_fraction or None, "greedy_passes": r.searches,
        "removed_fraction": round(r.removed / n, 6) if n else 0.0,
        "largest_cluster": r.largest_cluster, "embedding_dim": int(x.shape[1]) if n else None,
        "kmeans_seconds": r.kmeans_seconds, "dedup_seconds": r.dedup_seconds,
    }
