"""semantic_dedup (SemDeDup) on constructed embeddings with planted near-duplicates of known
cosine: the greedy, the exact and clustered paths, eps search, determinism, the stage's files."""

from __future__ import annotations

import json
import random

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from dedup.semantic import cluster_order, greedy, semdedup
from pipeline import embeddings
from pipeline.embeddings import normalise
from pipeline.stage import StageError, get_spec, run_stage, stage_dir
from tests.curation_fixtures import make_build, mark_done, read_parquet


def _orthogonal(rng: np.random.Generator, to: np.ndarray) -> np.ndarray:
    u = rng.normal(size=to.shape)
    u -= (u * to).sum(axis=1, keepdims=True) * to
    return normalise(u)


def planted(n_orig: int = 300, topics: int = 6, dim: int = 64, with_copies: int = 30,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x, group): originals at cosine 0.6 to one of ``topics`` centres (so unrelated rows of a
    topic meet at ~0.36), ``with_copies`` of them with 1-3 copies at cosine 0.97-0.99 (copies of
    one original meet at >= 0.94). Rows of a group are an original and its copies."""
    rng = np.random.default_rng(seed)
    centres = normalise(rng.normal(size=(topics, dim)))
    c = centres[rng.integers(0, topics, n_orig)]
    orig = normalise(0.6 * c + 0.8 * _orthogonal(rng, c))
    src = np.repeat(rng.choice(n_orig, with_copies, replace=False),
                    rng.integers(1, 4, with_copies))
    cos = rng.uniform(0.97, 0.99, len(src))[:, None]
    copies = normalise(cos * orig[src] + np.sqrt(1 - cos**2) * _orthogonal(rng, orig[src]))
    return (np.concatenate([orig, copies]).astype(np.float32),
            np.concatenate([np.arange(n_orig), src]))


def _naive(x: np.ndarray, threshold: float) -> np.ndarray:
    kept: list[int] = []
    by = np.full(len(x), -1)
    for i in range(len(x)):
        s = x[kept] @ x[i] if kept else np.zeros(0, np.float32)
        if len(s) and s.max() >= np.float32(threshold):
            by[i] = kept[int(s.argmax())]
        else:
            kept.append(i)
    return by


@pytest.mark.parametrize("block,max_cells", [(7, 7 * 5), (64, 64 * 64), (1024, 1 << 23)])
def test_greedy_is_the_row_by_row_greedy_over_kept_rows_for_any_block_size(block, max_cells):
    x, _ = planted(seed=1)
    x = x[np.random.default_rng(2).permutation(len(x))]
    for threshold in (0.99, 0.95, 0.5, 0.3):
        g = greedy(x, threshold, block=block, max_cells=max_cells)
        want = _naive(x, threshold)
        assert (g.by == want).all(), threshold
        hit = want >= 0
        assert np.allclose(g.cos[hit], np.einsum("ij,ij->i", x[hit], x[want[hit]]), atol=1e-6)
    assert 0 < greedy(x, 0.95).removed < greedy(x, 0.3).removed


def test_a_row_near_only_a_dropped_row_stays_and_the_threshold_is_inclusive():
    # a-b 0.96, b-c 0.96, a-c 0.8432: b goes (a is kept), c stays: its only near row is gone
    a, b = [1.0, 0.0, 0.0], [0.96, 0.28, 0.0]
    c = [0.8432, 0.5376, 0.0]
    x = normalise(np.array([a, b, c]))
    assert np.isclose(x[1] @ x[2], 0.96, atol=1e-4)
    g = greedy(x, 0.95)
    assert g.by.tolist() == [-1, 0, -1]
    assert np.isclose(g.cos[1], 0.96)
    assert greedy(x[:2], float(np.float32(x[0] @ x[1]))).by.tolist() == [-1, 0]  # >=, not >
    assert greedy(x[:2], float(np.nextafter(np.float32(x[0] @ x[1]), 2))).by.tolist() == [-1, -1]


def _one_kept_per_group(by: np.ndarray, group: np.ndarray) -> None:
    dropped = np.flatnonzero(by >= 0)
    assert (group[dropped] == group[by[dropped]]).all()  # every drop names its own group
    kept_per_group = np.bincount(group[by < 0], minlength=group.max() + 1)
    assert (kept_per_group == 1).all()


def test_exact_path_drops_every_planted_copy_keeps_distinct_rows_and_the_farthest_stays():
    x, group = planted()
    r = semdedup(x, eps=0.08)
    assert r.clusters == 1 and r.removed == len(x) - 300
    _one_kept_per_group(r.by, group)
    centroid = normalise(x.mean(axis=0, keepdims=True))[0]
    to_c = x @ centroid
    for g in np.unique(group[r.by >= 0]):
        members = np.flatnonzero(group == g)
        assert r.by[members[to_c[members].argmin()]] == -1  # SemDeDup keeps the farthest
    hit = r.by >= 0
    assert np.allclose(r.cos[hit], np.einsum("ij,ij->i", x[hit], x[r.by[hit]]), atol=1e-6)
    assert r.cos[hit].min() >= 0.92


def test_exact_and_clustered_paths_agree_when_copies_are_far_closer_than_clusters():
    x, group = planted(n_orig=2000, topics=8, with_copies=200, seed=3)
    exact = semdedup(x, eps=0.08, exact_below=len(x) + 1)
    clustered = semdedup(x, eps=0.08, exact_below=0, clusters=8, seed=0)
    assert exact.clusters == 1 and clustered.clusters == 8
    assert clustered.largest_cluster < len(x) / 2
    assert clustered.removed == exact.removed == len(x) - 2000
    _one_kept_per_group(exact.by, group)
    _one_kept_per_group(clustered.by, group)


def test_clustered_path_is_deterministic_across_runs_threads_and_row_order():
    x, _ = planted(n_orig=1500, topics=8, with_copies=150, seed=4)
    threads = faiss.omp_get_max_threads()
    runs = []
    try:
        for t in (threads, 1, threads):
            faiss.omp_set_num_threads(t)
            runs.append(semdedup(x, eps=0.08, exact_below=0, clusters=20, seed=5))
    finally:
        faiss.omp_set_num_threads(threads)
    assert all((r.by == runs[0].by).all() for r in runs)
    groups, _, _ = cluster_order(x, 20, 0, 20, 5)
    other, _, _ = cluster_order(x, 20, 0, 20, 6)  # the seed matters
    assert len(groups) > 1
    assert [g.tolist() for g in groups] != [g.tolist() for g in other]


@pytest.mark.parametrize("target", [0.2, 0.5])
def test_target_fraction_finds_the_eps_that_removes_that_fraction(target):
    x, _ = planted()  # 300 originals + their copies: a target of the copies' share is exact
    n = len(x)
    copies_share = (n - 300) / n
    r = semdedup(x, target_fraction=copies_share)
    assert r.removed == n - 300 and 0.02 < r.eps < 0.6 and r.searches > 1
    r = semdedup(x, target_fraction=target)  # past the copies: unrelated rows go too
    assert abs(r.removed / n - target) <= 0.01
    assert semdedup(x, eps=r.eps).removed == r.removed


def _stage_build(tmp_path, x: np.ndarray, extra: str = "eps: 0.08", order_seed: int = 0,
                 parts: int = 1):
    cfg = make_build(tmp_path, "embed:\n  checkpoint: model.pt\nsemantic_dedup:\n  enabled: "
                     f"true\n  exact_below: 100\n  clusters: 6\n  {extra}\n")
    uids = [f"u{i:04d}" for i in range(len(x))]
    rows = [{"uid": u, "url": f"http://127.0.0.1/{u}.jpg", "caption": f"caption {i}"}
            for i, u in enumerate(uids)]
    rnd = random.Random(order_seed)
    rnd.shuffle(rows)
    mark_done(cfg, "embed", rows)
    folder = stage_dir(cfg, get_spec("embed"))
    order = list(range(len(x)))
    rnd.shuffle(order)
    for p, chunk in enumerate(np.array_split(np.array(order), parts)):
        embeddings.write_part(folder, p, [uids[i] for i in chunk], x[chunk],
                              np.ones((len(chunk), 4), np.float32))
    return cfg, uids


def test_stage_writes_kept_and_dropped_with_the_kept_uid_and_cosine(tmp_path):
    x, group = planted()
    cfg, uids = _stage_build(tmp_path, x)
    report = run_stage(cfg, "semantic_dedup", log=lambda s: None)
    out = stage_dir(cfg, get_spec("semantic_dedup"))
    kept, dropped = read_parquet(out / "kept.parquet"), read_parquet(out / "dropped.parquet")
    assert report["rows_in"] == len(x) == len(kept) + len(dropped)
    assert len(dropped) == len(x) - 300
    assert set(kept[0]) == {"uid", "url", "caption"}
    assert {(d["stage"], d["reason"]) for d in dropped} == {("semantic_dedup",
                                                             "semantic_duplicate")}
    index = {u: i for i, u in enumerate(uids)}
    kept_uids = {k["uid"] for k in kept}
    for d in dropped:
        kept_uid, cos = d["detail"].split(" cos=")
        assert kept_uid in kept_uids
        i, j = index[d["uid"]], index[kept_uid]
        assert group[i] == group[j]
        assert abs(float(cos) - float(x[i] @ x[j])) < 1e-3  # float16 on disk
    report_json = json.loads((out / "report.json").read_text())
    assert report_json["clusters"] == 6 and not report_json["exact"]
    assert report_json["eps"] == 0.08
    assert report_json["removed_fraction"] == pytest.approx(len(dropped) / len(x), abs=1e-6)
    for key in ("largest_cluster", "kmeans_seconds", "dedup_seconds"):
        assert key in report_json


def test_stage_output_does_not_depend_on_input_row_order_or_parts(tmp_path):
    x, _ = planted(seed=7)
    outs = []
    for k, (seed, parts) in enumerate([(0, 1), (1, 3)]):
        cfg, _ = _stage_build(tmp_path / str(k), x, order_seed=seed, parts=parts)
        run_stage(cfg, "semantic_dedup", log=lambda s: None)
        out = stage_dir(cfg, get_spec("semantic_dedup"))
        outs.append([pq.read_table(out / f).to_pylist() for f in ("kept.parquet",
                                                                  "dropped.parquet")])
    assert outs[0] == outs[1]
    assert len(outs[0][1]) > 0


def test_stage_target_fraction_reports_the_eps_found(tmp_path):
    x, _ = planted()
    cfg, _ = _stage_build(tmp_path, x, extra="target_fraction: 0.3")
    report = run_stage(cfg, "semantic_dedup", log=lambda s: None)
    assert report["eps_searched"] and report["target_fraction"] == 0.3
    assert abs(report["removed_fraction"] - 0.3) <= 0.01
    assert report["dropped"] == round(report["removed_fraction"] * len(x))


def test_a_row_without_an_embedding_is_an_error_naming_the_uid_and_folder(tmp_path):
    x, _ = planted()
    cfg, uids = _stage_build(tmp_path, x)
    folder = stage_dir(cfg, get_spec("embed"))
    embeddings.write_part(folder, 0, uids[1:], x[1:], np.ones((len(x) - 1, 4), np.float32))
    with pytest.raises(StageError, match=f"uid {uids[0]} .*{folder}"):
        run_stage(cfg, "semantic_dedup", log=lambda s: None)
