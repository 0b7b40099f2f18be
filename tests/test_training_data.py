"""The streaming loader: shard specs, splitting, mixing, corrupt samples, exact resume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import training.model as M
from training.data import (
    ClipStream,
    LoaderConfig,
    LoaderPosition,
    expand_shards,
    make_loader,
    steps_per_epoch,
)
from training.toydata import write_toy_shards


@pytest.fixture(scope="module")
def tools():
    _, train_pre, eval_pre, tok = M.create("witforge-micro")
    return train_pre, eval_pre, tok


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_toy_shards(d, 60, per_shard=15, corrupt=(3, 40), size=32)
    return d


def _take(cfg, tools, n, position=None, pre=1):
    it = iter(make_loader(cfg, tools[pre], tools[2], position))
    return [next(it) for _ in range(n)]


def test_shard_specs_folder_brace_and_list(shards):
    folder = expand_shards(str(shards))
    assert len(folder) == 4
    assert expand_shards(f"{shards}/shard-{{000000..000003}}.tar") == folder
    assert expand_shards([folder[0], f"{shards}/shard-00000{{1..2}}.tar"]) == folder[:3]
    assert steps_per_epoch([str(shards)], 10, 2) == 3  # 60 samples in sizes.json / 20
    with pytest.raises(ValueError, match="no shards"):
        expand_shards(str(shards / "nothing-here"))


def test_corrupt_samples_are_skipped_and_counted(shards, tools):
    cfg = LoaderConfig([str(shards)], batch_size=10, resampled=False, shuffle_buffer=0)
    batches = _take(cfg, tools, 6)  # one pass = 60 raw samples, 58 good
    pos = LoaderPosition()
    for images, tokens, info in batches:
        assert images.shape == (10, 3, 32, 32) and tokens.shape == (10, 16)
        pos.update(info)
    assert pos.skipped == {"bad_image": 2}
    keys = [k for b in batches for k in b[2]["keys"]]
    assert len(set(keys[:58])) == 58  # every good sample once before the second pass


def test_unreadable_tar_is_counted_not_fatal(tmp_path, tools):
    write_toy_shards(tmp_path, 20, per_shard=10, size=32)
    bad = tmp_path / "shard-000001.tar"
    bad.write_bytes(bad.read_bytes()[:1500])  # truncated mid-member
    cfg = LoaderConfig([str(tmp_path)], batch_size=8, resampled=False, shuffle_buffer=0)
    pos = LoaderPosition()
    for b in _take(cfg, tools, 3):
        pos.update(b[2])
    assert pos.skipped.get("unreadable_tar", 0) >= 1


def test_ranks_and_workers_get_disjoint_non_empty_data_even_with_one_shard(tmp_path, tools):
    write_toy_shards(tmp_path, 24, per_shard=24, size=32)  # a single shard, 4 slots
    seen = []
    for rank in range(2):
        cfg = LoaderConfig([str(tmp_path)], batch_size=3, resampled=False, shuffle_buffer=0,
                           workers=2, rank=rank, world_size=2)
        keys = [k for b in _take(cfg, tools, 4) for k in b[2]["keys"]]
        assert len(keys) == 12
        seen.append(set(keys))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 24


def test_sources_are_mixed_by_weight(tmp_path, tools):
    a = write_toy_shards(tmp_path / "a", 40, per_shard=20, prefix="a", size=32)
    b = write_toy_shards(tmp_path / "b", 40, per_shard=20, prefix="b", seed=1, size=32)
    a_keys = {k for k in _keys_of(a)}
    cfg = LoaderConfig([str(tmp_path / "a"), str(tmp_path / "b")], weights=[3, 1],
                       batch_size=20, shuffle_buffer=10)
    keys = [k for bt in _take(cfg, tools, 10) for k in bt[2]["keys"]]
    share_a = sum(k in a_keys for k in keys) / len(keys)
    assert 0.65 < share_a < 0.85  # 0.75 expected; 200 draws
    assert b


def _keys_of(paths):
    import webdataset as wds

    for p in paths:
        for s in wds.WebDataset(p, shardshuffle=False):
            yield s["__key__"]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_position_gives_the_same_next_batches(shards, tools, workers):
    cfg = LoaderConfig([str(shards)], batch_size=7, seed=3, shuffle_buffer=20,
                       workers=workers)
    reference = _take(cfg, tools, 7, pre=0)  # train preprocess: random crops are seeded too
    pos = LoaderPosition()
    for b in _take(cfg, tools, 3, pre=0):
        pos.update(b[2])
    resumed = _take(cfg, tools, 4, position=LoaderPosition.from_dict(pos.to_dict()), pre=0)
    for ref, got in zip(reference[3:], resumed, strict=True):
        assert ref[2]["keys"] == got[2]["keys"]
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


def test_decode_reasons():
    assert ClipStream.decode({"__key__": "k", "txt": b"x"}) == "missing_image"
    assert ClipStream.decode({"__key__": "k", "jpg": b"x"}) == "missing_caption"
    assert ClipStream.decode({"__key__": "k", "jpg": b"x", "txt": b"  "}) == "empty_caption"
    assert ClipStream.decode({"__key__": "k", "jpg": b"x", "txt": b"\xff"}) == \
        "bad_caption_encoding"
    assert ClipStream.decode({"__key__": "k", "jpg": b"nope", "txt": b"a"}) == "bad_image"


def test_bad_weights_are_rejected(shards, tools):
    cfg = LoaderConfig([str(shards)], batch_size=2, weights=[1, 2])
    with pytest.raises(ValueError, match="weights"):
        ClipStream(cfg, tools[1], tools[2])
    assert Path(shards).is_dir()


def test_zero_and_one_worker_give_the_same_batches(shards, tools):
    # --workers 0 (in process) and 1 read one stream: the data a run sees must not depend
    # on where the loading runs (README, `--workers`)
    base = dict(batch_size=7, seed=5, shuffle_buffer=20)
    a = _take(LoaderConfig([str(shards)], workers=0, **base), tools, 4, pre=0)
    b = _take(LoaderConfig([str(shards)], workers=1, **base), tools, 4, pre=0)
    for x, y in zip(a, b, strict=True):
        assert x[2]["keys"] == y[2]["keys"]
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


@pytest.mark.parametrize("priority", ["normal", "low", "idle"])
def test_workers_run_at_the_configured_cpu_priority(shards, tools, priority):
    # idle (SCHED_IDLE) is what the train loop picks on the CPU: the worker must only take
    # cycles the training step leaves free; a regression here shows only as lost throughput
    cfg = LoaderConfig([str(shards)], batch_size=4, workers=1, worker_priority=priority)
    it = iter(make_loader(cfg, tools[1], tools[2]))
    next(it)
    (pid,) = [w.pid for w in it._workers]
    own_nice = os.getpriority(os.PRIO_PROCESS, 0)
    policy = os.sched_getscheduler(pid)
    nice = os.getpriority(os.PRIO_PROCESS, pid)
    del it
    assert policy == (os.SCHED_IDLE if priority == "idle" else os.SCHED_OTHER)
    assert nice == (min(19, own_nice + 10) if priority == "low" else own_nice)


def test_unknown_worker_priority_is_rejected(shards, tools):
    cfg = LoaderConfig([str(shards)], batch_size=4, workers=1, worker_priority="high")
    with pytest.raises(ValueError, match="'high' is not one of normal, low, idle"):
        make_loader(cfg, tools[1], tools[2])


def test_train_loop_idles_its_workers_on_the_cpu_only():
    from training.train import worker_priority

    assert worker_priority("auto", torch.device("cpu")) == "idle"
    assert worker_priority("auto", torch.device("cuda", 0)) == "normal"
    assert worker_priority("low", torch.device("cpu")) == "low"
