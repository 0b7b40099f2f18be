"""Every sample is drawn equally often, whatever the shard sizes and the (ranks x workers).

Shards of 20, 6, 12, 4 and 16 samples. With the old split (each slot drew only among its
own shards ``shards[slot::slots]``) a key came up to 3.6x as often as uniform (counts of
93-545 where 150 +- 49 passes) in every layout below, resampled or not; size-weighted shard
draws fail too (a 20-sample shard's keys ~205 times).
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from math import sqrt

import pytest
import torch

from training.data import ClipStream, LoaderConfig, make_loader
from training.toydata import write_toy_shards

SIZES = (20, 6, 12, 4, 16)
N = sum(SIZES)  # 58
LAYOUTS = [(1, 2), (2, 2), (1, 3)]  # (ranks, workers)


def _pixels(img):  # counting needs the decode, not open_clip's transform
    return torch.zeros(1)


def _tokens(texts):
    return torch.zeros(len(texts), 1, dtype=torch.long)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    d = tmp_path_factory.mktemp("uneven")
    sizes = {}
    for k, n in enumerate(SIZES):  # one call per shard: shard k is s<k>-000000.tar
        write_toy_shards(d, n, per_shard=n, prefix=f"s{k}", seed=k, size=8)
        sizes.update(json.loads((d / "sizes.json").read_text()))
    (d / "sizes.json").write_text(json.dumps(sizes))
    return d


def _counts(folder, ranks, workers, batches_per_rank, batch_size, **kw):
    """Draws per key over all ranks, and each slot's keys in order."""
    counts, by_slot = Counter(), {}
    for rank in range(ranks):
        cfg = LoaderConfig([str(folder)], batch_size=batch_size, workers=workers, rank=rank,
                           world_size=ranks, seed=7, **kw)
        it = iter(make_loader(cfg, _pixels, _tokens))
        for _ in range(batches_per_rank):
            info = next(it)[2]
            counts.update(info["keys"])
            by_slot.setdefault(info["slot"], []).extend(info["keys"])
        del it
    return counts, by_slot


@pytest.mark.parametrize("ranks,workers", LAYOUTS)
@pytest.mark.parametrize("resampled,split", [(True, "auto"), (False, "auto"),
                                             (True, "sample")])
def test_every_sample_is_drawn_at_the_uniform_rate(uneven, ranks, workers, resampled, split):
    draws = 8_700  # 150 per sample
    batch = 29
    counts, by_slot = _counts(uneven, ranks, workers, draws // (ranks * batch), batch,
                              resampled=resampled, split=split, shuffle_buffer=20)
    assert len(counts) == N and sum(counts.values()) == draws
    expected = draws / N
    # Whole-shard draws make a shard's keys move together: a key's count varies like the
    # number of draws of its shard, Binomial(D, 1/5), whose sd is below sqrt(expected).
    worst = max(abs(c - expected) for c in counts.values())
    assert worst < 4 * sqrt(expected), (worst, expected, counts.most_common(3))
    assert len(by_slot) == ranks * workers
    first = [tuple(keys[:20]) for keys in by_slot.values()]
    assert len(set(first)) == len(first)  # slots are seeded apart, not copies of one stream


@pytest.mark.parametrize("ranks,workers", LAYOUTS)
def test_resampled_slots_see_every_sample_once_per_round(uneven, ranks, workers):
    # Each slot reads all shards in rounds (a fresh permutation each): after k rounds every
    # sample has come exactly k times in every slot. With draws with replacement one slot's
    # run of repeats left the slots unequally familiar with the data (a loss sawtooth).
    _, by_slot = _counts(uneven, ranks, workers, 4 * workers, 29, shuffle_buffer=0)
    for keys in by_slot.values():  # 4 batches of 29 = 2 rounds of N
        assert set(Counter(keys).values()) == {2} and len(set(keys)) == N
    assert len({tuple(keys) for keys in by_slot.values()}) == ranks * workers


@pytest.mark.parametrize("ranks,workers", LAYOUTS)
def test_passes_give_every_slot_the_same_sample_count(uneven, ranks, workers):
    # After every S passes each slot has read exactly N samples and every sample has come
    # exactly S times. 4 batches of 29 = 2N samples per slot = 2 x S passes.
    slots = ranks * workers
    counts, by_slot = _counts(uneven, ranks, workers, 4 * workers, 29, resampled=False,
                              shuffle_buffer=0)
    assert set(counts.values()) == {2 * slots}, counts.most_common(2)
    assert {len(keys) for keys in by_slot.values()} == {2 * N}


@pytest.mark.parametrize("slots", [2, 3, 4, 7])
def test_reshuffled_passes_still_cover_each_sample_once_per_pass(uneven, slots):
    # With shuffling on, the shard order changes every pass; the slots must still agree on
    # it. Read from the plan itself (the shuffle buffer only delays samples in a slot).
    ds = ClipStream(LoaderConfig([str(uneven)], batch_size=1, resampled=False, workers=slots,
                                 shuffle_buffer=100), _pixels, _tokens)
    covered = Counter()
    for slot in range(slots):
        plan, read = ds._shard_order(0, slot, slots), 0
        while read < 2 * N:
            url, start, stop = next(plan)
            assert 0 <= start < stop <= 20, (url, start, stop)
            covered.update((url, i) for i in range(start, stop))
            read += stop - start
        assert read == 2 * N
    assert len(covered) == N and set(covered.values()) == {2 * slots}


def test_pass_without_sizes_json_warns_and_still_splits_by_shard(uneven, tmp_path):
    for p in uneven.glob("*.tar"):
        (tmp_path / p.name).write_bytes(p.read_bytes())  # no sizes.json here
    cfg = LoaderConfig([str(tmp_path)], batch_size=4, resampled=False, workers=2)
    with pytest.warns(UserWarning, match="not all in sizes.json.*equal sample counts only"):
        ds = ClipStream(cfg, _pixels, _tokens)
    assert len(ds.notes) == 1 and ds.modes == ["own"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resampled draws never need sizes.json
        assert ClipStream(LoaderConfig([str(tmp_path)], batch_size=4, workers=2), _pixels,
                          _tokens).notes == []
    counts, _ = _counts(tmp_path, 1, 2, 4, 4, resampled=False)
    assert sum(counts.values()) == 16


def test_split_shard_with_fewer_shards_than_slots_is_refused(uneven):
    cfg = LoaderConfig([str(uneven)], batch_size=4, resampled=False, split="shard",
                       workers=3, world_size=2)
    with pytest.raises(ValueError, match="5 shards for 6 slots"):
        ClipStream(cfg, _pixels, _tokens)
