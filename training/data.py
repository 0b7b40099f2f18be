"""Streaming WebDataset loader for CLIP training.

One *slot* = (rank, worker). Every slot reads its own deterministic, infinite stream:

    shards --(split by rank and worker)--> tar samples --(seeded shuffle buffer)-->
    weighted mix of sources --> decode (corrupt samples skipped AND counted) -->
    open_clip preprocess + tokenizer --> batch (images, tokens, info)

* Local .tar shards are read by ``training.tarstream`` (a plain header parser; other URLs by
  webdataset), and open_clip's usual transform runs as ``training.fastpre.FastBatch``: the
  same PIL crops and resizes, ToTensor + Normalize once per batch (train-time crop boxes are
  drawn from a Python RNG seeded per batch: torchvision's distribution, not its exact draws).
  Under half the loader CPU (bench: 831 -> 1,400-2,400 samples/s per worker), which matters
  when the loader shares 2 cores with torch's threads.

* ``resampled=True``: each slot reads whole shards from *all* shards of a source, in rounds
  that are each a permutation drawn from the slot's own seeded RNG (independent infinite
  streams like open_clip's ``ResampledShards2``, but no repeats within a round). A sample's
  rate is P(its shard) / E[samples per read]: equal for all samples only when every shard is
  equally likely (size-weighted picks would show a 500-sample shard's samples 2x as often as
  a 246-sample one's). Rounds, not draws with replacement: every slot sees every sample once
  per round, so the slots feeding alternate steps stay equally familiar with the data (with
  replacement, 3 shards, a run of repeats made a 0.18 even/odd loss sawtooth). No sizes.json.
* ``resampled=False`` ("passes"): all slots walk a source's shards in one shared order
  (reshuffled per pass) and each sample of a pass goes to exactly one slot. ``split=auto``
  with every shard in sizes.json: in pass e, slot s of S takes samples [r*N//S, (r+1)*N//S)
  of the pass's N samples, r = (s + e) % S; so a slot reads only the shards its range
  touches, and after every S passes every slot has read exactly N samples and each sample has
  been seen exactly S times, however uneven the shards are. Without sizes.json: whole
  shards ``shards[slot::slots]`` (equal shard counts; equal sample counts only for
  equal-sized shards; a warning says so), or with fewer shards than slots the deal below.
* ``split=sample`` (either mode): all slots read one shared shard sequence and deal its
  samples round-robin (sample g of the sequence goes to slot g % S): exact shares without
  sizes.json, at S times the reads. ``split=shard``: whole shards ``shards[slot::slots]`` in
  pass mode (the old split; shares as above), the same as ``auto`` when resampled.
* Streams are infinite, so every rank yields the same number of batches; the train loop
  decides how many steps make an epoch (``steps_per_epoch``).
* Position: each batch's ``info`` carries its slot's sample counters. The train loop keeps the
  latest per slot (``LoaderPosition``) in the checkpoint; on resume each slot replays its
  stream *without decoding images* up to that point, so the next batch is the same one the
  interrupted run would have seen. DataLoader hands out batches from workers round-robin;
  a resumed loader rotates worker roles so that order continues where it stopped.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import io
import json
import os
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from pipeline.config import WORKER_PRIORITIES
from training.fastpre import batch_preprocess
from training.tarstream import is_local_tar, tar_expander

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# PIL format to try first for each key: skips probing every other plugin (~1 ms per batch)
_FORMAT_OF = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def expand_shards(spec: str | Path | list[str]) -> list[str]:
    """Shard paths from a folder (its *.tar), a brace pattern ("a-{000..009}.tar"), several
    patterns joined by "::", or a list of any of these."""
    if isinstance(spec, list):
        return [u for s in spec for u in expand_shards(s)]
    spec = str(spec)
    if Path(spec).is_dir():
        urls = sorted(str(p) for p in Path(spec).glob("*.tar"))
    else:
        urls = expand_urls(spec)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if not urls or len(missing) == len(urls):
        raise ValueError(f"no shards found in {spec}")
    if missing:
        raise ValueError(f"{spec}: {len(missing)} shard(s) missing, e.g. {missing[0]}")
    return urls


def shard_sizes(urls: list[str]) -> list[int] | None:
    """Samples in each of ``urls`` according to the sizes.json next to it (open_clip's
    format), or None when a shard is not listed (remote URLs, hand-made tars)."""
    sizes, cache = [], {}
    for u in urls:
        sizes_path = Path(u).parent / "sizes.json"
        if sizes_path not in cache:
            cache[sizes_path] = (json.loads(sizes_path.read_text()) if sizes_path.is_file()
                                 else {})
        n = cache[sizes_path].get(Path(u).name)
        if n is None:
            return None
        sizes.append(int(n))
    return sizes


def count_samples(urls: list[str]) -> int | None:
    """Samples in ``urls`` according to sizes.json, or None when a shard is not listed."""
    sizes = shard_sizes(urls)
    return None if sizes is None else sum(sizes)


@dataclass
class LoaderConfig:
    sources: list[str]  # one shard spec per source (see expand_shards)
    batch_size: int  # per rank
    weights: list[float] | None = None  # sampling weight per source (default: equal)
    seed: int = 0
    resampled: bool = True
    shuffle_buffer: int = 1000  # 0 = keep shard order (and shard order is not shuffled)
    split: str = "auto"  # auto | shard | sample
    workers: int = 0
    rank: int = 0
    world_size: int = 1
    # CPU priority of worker processes: normal | low (nice 10) | idle (SCHED_IDLE: only
    # cycles nothing else wants); the train loop picks idle when it trains on the CPU
    worker_priority: str = "normal"


@dataclass
class LoaderPosition:
    """What the train loop stores in a checkpoint to resume the stream exactly."""

    batches: int = 0  # batches this rank has consumed
    slots: dict[int, dict[str, Any]] = field(default_factory=dict)  # role -> counters
    skipped: dict[str, int] = field(default_factory=dict)  # corrupt samples by reason

    def update(self, info: dict[str, Any]) -> None:
        self.batches += 1
        self.slots[info["role"]] = {"consumed": list(info["consumed"]), "batch": info["batch"]}
        for reason, n in info["skipped"].items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "skipped": dict(self.skipped),
                "slots": {str(k): v for k, v in self.slots.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoaderPosition:
        return cls(d["batches"], {int(k): v for k, v in d["slots"].items()}, dict(d["skipped"]))


def _rng(*parts: Any) -> random.Random:
    # A string seed is hashed with sha512 by random.Random: stable across runs and machines.
    return random.Random(":".join(str(p) for p in parts))


class ClipStream(IterableDataset):
    """Yields (images [B,3,H,W], tokens [B,L], info) batches forever; see module docstring.

    ``notes``: what the split could not guarantee (also issued once as a warning)."""

    def __init__(self, cfg: LoaderConfig, preprocess: Callable, tokenizer: Callable,
                 position: LoaderPosition | None = None):
        super().__init__()
        if cfg.split not in ("auto", "shard", "sample"):
            raise ValueError(f"split must be auto, shard or sample, not {cfg.split!r}")
        self.cfg = cfg
        self.urls = [expand_shards(s) for s in cfg.sources]
        w = cfg.weights or [1.0] * len(self.urls)
        if len(w) != len(self.urls) or min(w) < 0 or sum(w) <= 0:
            raise ValueError(f"weights {w} must be non-negative, one per source")
        self.cum_weights = [sum(w[: i + 1]) / sum(w) for i in range(len(w))]
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.batch_preprocess = batch_preprocess(preprocess)
        self.position = position or LoaderPosition()
        slots = max(1, cfg.workers) * cfg.world_size
        self.sizes = [shard_sizes(u) if not cfg.resampled else None for u in self.urls]
        self.modes = [self._mode(src, slots) for src in range(len(self.urls))]
        self.notes = [f"{cfg.sources[src]}: shards not all in sizes.json, so passes split "
                      f"whole shards over {slots} slots: slots get equal sample counts only "
                      "if the shards are equal-sized (write sizes.json or use --split sample)"
                      for src, m in enumerate(self.modes)
                      if m == "own" and cfg.split == "auto"]
        for note in self.notes:
            warnings.warn(note, stacklevel=2)

    # -- raw (undecoded) sample streams ------------------------------------------------------
    def _mode(self, src: int, slots: int) -> str:
        """How source ``src`` is split over ``slots`` (module docstring): draw (resampled:
        independent rounds of whole shards), deal (shared sequence, round-robin samples), range
        (passes: contiguous sample ranges from sizes.json), own (passes: whole shards)."""
        cfg, urls, sizes = self.cfg, self.urls[src], self.sizes[src]
        if cfg.split == "sample":
            return "deal"
        if cfg.resampled:
            return "draw"
        if cfg.split == "shard" or (sizes is None and len(urls) >= slots):
            if len(urls) < slots:
                raise ValueError(f"{cfg.sources[src]}: split=shard needs at least one shard "
                                 f"per slot: {len(urls)} shards for {slots} slots")
            return "own"
        if sizes is None:
            return "deal"
        if sum(sizes) < slots:
            raise ValueError(f"{cfg.sources[src]}: {sum(sizes)} samples (sizes.json) cannot "
                             f"feed {slots} slots")
        return "range"

    def _shard_order(self, src: int, slot: int, slots: int) -> Iterator[tuple[str, int, int]]:
        """(url, start, stop) forever, for one source in one slot: keep the shard's samples
        start..stop-1 (stop -1: to its end). Deal mode filters further (``_raw_samples``)."""
        urls, mode, seed = self.urls[src], self.modes[src], self.cfg.seed
        # Deal and range split one shared sequence: every slot must walk it in the same order.
        who = slot if mode in ("draw", "own") else "all"
        if self.cfg.resampled:
            rng = _rng(seed, "resample", src, who)
            while True:  # rounds: a fresh permutation of all shards each (see docstring)
                order = list(urls)
                rng.shuffle(order)
                yield from ((u, 0, -1) for u in order)
        mine = urls[slot::slots] if mode == "own" else urls
        sizes = self.sizes[src]
        epoch = 0
        while True:
            order = list(range(len(mine)))
            if self.cfg.shuffle_buffer > 0:
                _rng(seed, "shards", src, who, epoch).shuffle(order)
            if mode != "range":
                yield from ((mine[k], 0, -1) for k in order)
            else:
                # Which range rotates with the pass: over any S passes every slot takes each
                # range once, so all slots read exactly N samples and every sample S times.
                total, pos, r = sum(sizes), 0, (slot + epoch) % slots
                lo, hi = r * total // slots, (r + 1) * total // slots
                for k in order:
                    start, stop = max(lo - pos, 0), min(hi - pos, sizes[k])
                    if start < stop:
                        yield mine[k], start, stop
                    pos += sizes[k]
            epoch += 1

    def _raw_samples(self, src: int, slot: int, slots: int, skipped: Counter) -> Iterator[dict]:
        def handler(exn: Exception) -> bool:
            skipped["unreadable_tar"] += 1  # truncated or malformed tar: rest of shard lost
            return True

        deal = self.modes[src] == "deal"

        def samples() -> Iterator[dict]:
            dealt = 0  # deal mode: samples of the shared sequence so far, in every slot
            for url, start, stop in self._shard_order(src, slot, slots):
                if is_local_tar(url):
                    files = tar_expander([url], handler)
                else:
                    stream = url_opener([{"url": url}], handler=handler)
                    files = tar_file_expander(stream, handler=handler)
                for i, s in enumerate(group_by_keys(files, handler=handler)):
                    if i == stop:
                        break  # the rest of this shard belongs to the next slot
                    if i < start:
                        continue
                    if deal:
                        dealt += 1
                        if (dealt - 1) % slots != slot:
                            continue
                    yield s

        it = samples()
        n = self.cfg.shuffle_buffer
        if n <= 0:
            return it
        return _shuffled(it, n, _rng(self.cfg.seed, "shuffle", src, slot))

    # -- decoding ------------------------------------------------------------------------------
    @staticmethod
    def decode(sample: dict) -> tuple[Image.Image, str] | str:
        """(image, caption), or the reason the sample is unusable."""
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            return "missing_image"
        if "txt" not in sample:
            return "missing_caption"
        try:
            caption = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            return "bad_caption_encoding"
        if not caption:
            return "empty_caption"
        try:
            try:
                img = Image.open(io.BytesIO(sample[key]), formats=[_FORMAT_OF[key]])
            except UnidentifiedImageError:  # extension and content disagree: probe all
                img = Image.open(io.BytesIO(sample[key]))
            img.load()
            return (img if img.mode == "RGB" else img.convert("RGB")), caption
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            return "bad_image"

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        cfg = self.cfg
        winfo = get_worker_info()
        n_workers = max(1, cfg.workers)
        worker = winfo.id if winfo else 0
        # Rotate roles so a resumed loader's first batch comes from the role that was next.
        role = (worker + self.position.batches) % n_workers
        slot, slots = cfg.rank * n_workers + role, cfg.world_size * n_workers
        saved = self.position.slots.get(role, {"consumed": [0] * len(self.urls), "batch": 0})
        skipped: Counter = Counter()
        streams = [self._raw_samples(s, slot, slots, skipped) for s in range(len(self.urls))]
        mix = _rng(cfg.seed, "mix", slot)
        consumed = list(saved["consumed"])
        # Replay without decoding: draw the same source choices and pull the same samples.
        for s, n in enumerate(consumed):
            for _ in range(n):
                next(streams[s])
        if len(streams) > 1:
            for _ in range(sum(consumed)):
                mix.random()
        skipped.clear()  # counted in the interrupted run already (LoaderPosition.skipped)
        batch_no = saved["batch"]
        while True:
            images, texts, keys = [], [], []
            while len(images) < cfg.batch_size:
                s = bisect.bisect_left(self.cum_weights, mix.random()) if len(streams) > 1 else 0
                s = min(s, len(streams) - 1)
                sample = next(streams[s])
                consumed[s] += 1
                got = self.decode(sample)
                if isinstance(got, str):
                    skipped[got] += 1
                    continue
                images.append(got[0])
                texts.append(got[1])
                keys.append(sample["__key__"])
            # Augmentations draw from torch's RNG: seed it per batch so a batch is a pure
            # function of its position, without disturbing the training process's RNG.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_batch_seed(cfg.seed, slot, batch_no))
                pixels = self.batch_preprocess(images)
            tokens = self.tokenizer(texts)
            batch_no += 1
            info = {"role": role, "slot": slot, "batch": batch_no, "consumed": list(consumed),
                    "skipped": dict(skipped), "keys": keys}
            skipped.clear()
            yield pixels, tokens, info


def _shuffled(it: Iterator[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle buffer (same algorithm as webdataset's, with our seeded rng)."""
    buf: list[dict] = []
    for x in it:
        if len(buf) < bufsize:
            buf.append(x)
            continue
        k = rng.randrange(bufsize)
        buf[k], x = x, buf[k]
        yield x
    rng.shuffle(buf)  # only reached for finite inputs
    yield from buf


def _batch_seed(seed: int, slot: int, batch: int) -> int:
    h = hashlib.sha256(f"{seed}:{slot}:{batch}".encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def make_loader(cfg: LoaderConfig, preprocess: Callable, tokenizer: Callable,
                position: LoaderPosition | None = None) -> DataLoader:
    """A DataLoader over ClipStream (batches are built inside the dataset)."""
    if cfg.worker_priority not in WORKER_PRIORITIES:
        raise ValueError(f"worker priority {cfg.worker_priority!r} is not one of "
                         f"{', '.join(WORKER_PRIORITIES)}")
    ds = ClipStream(cfg, preprocess, tokenizer, position)
    return DataLoader(ds, batch_size=None, num_workers=cfg.workers,
                      persistent_workers=cfg.workers > 0,
                      prefetch_factor=2 if cfg.workers > 0 else None,
                      worker_init_fn=functools.partial(set_worker_priority,
                                                       cfg.worker_priority))


def set_worker_priority(priority: str, worker_id: int = 0) -> None:
    """Lower this (worker) process's CPU priority. Why: when the training step itself runs
    on the same cores, torch's threads wait for each other at every op, so a worker that
    takes a core from one of them stalls both. ``idle`` (Linux SCHED_IDLE) runs the worker
    only on cycles torch leaves free — between and inside small single-threaded ops, and
    while the step waits for data (bench_train, 2 cores: 0.93-0.95x of a bare step with 2 idle
    workers in 3 runs; 0.86 and 0.97x with one nice-10 worker). ``low`` is nice 10, for
    machines shared with other jobs where an idle worker could starve."""
    if priority == "low":
        os.nice(10)
    elif priority == "idle":
        if hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        else:  # not Linux: the lowest nice level is the nearest thing
            os.nice(19)


def steps_per_epoch(sources: list[str], batch_size: int, world_size: int,
                    weights: list[float] | None = None) -> int:
    """Steps that show each sample about once: the samples of all sources (sizes.json) over
    the global batch; at least 1."""
    urls = [expand_shards(s) for s in sources]
    counts = [count_samples(u) for u in urls]
    if any(c is None for c in counts):
        missing = [s for s, c in zip(sources, counts, strict=True) if c is None]
        raise ValueError(f"no sizes.json entry for shards of {missing}; pass --steps")
    return max(1, sum(counts) // (batch_size * world_size))
