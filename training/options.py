"""Options of `witforge train`: a build's `train:` section, overridden by explicit flags.

``--build manifests/x.yaml`` reads TrainConfig (pipeline/config.py), trains on the build's shard
folder (runs/<build>/14_shard/) and writes runs/<build>/train/; the eval sets of the build's
``eval:`` section are evaluated along the way. Without ``--build``, ``--train-data`` and
``--out`` say where.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import WORKER_PRIORITY_CHOICES

PRECISIONS = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "amp_bf16": "bf16", "amp": "fp16"}


@dataclass
class TrainOptions:
    train_data: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    out: str = ""
    model: str = "witforge-tiny"
    batch_size: int = 64  # per process
    epochs: int = 1
    steps: int = 0  # 0 = epochs x (samples in sizes.json / global batch)
    lr: float = 5e-4
    warmup: int = 10
    weight_decay: float = 0.2
    accum_freq: int = 1
    grad_clip: float = 1.0
    precision: str = "fp32"
    loss: str = "clip"
    workers: int = 2
    worker_priority: str = "auto"  # auto = idle when training on the CPU, else normal
    save_every: int = 100
    keep: int = 2
    seed: int = 0
    resume: str | None = None
    stop_at: int = 0
    resampled: bool = True
    shuffle_buffer: int = 1000
    split: str = "auto"
    no_augment: bool = False
    eval_every: int = 0
    zeroshot: list[str] = field(default_factory=list)
    retrieval: list[str] = field(default_factory=list)
    templates: str = "dataset"
    threads: int = 0  # torch intra-op threads per process (0 = torch's default)
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory
    patch_dropout: float = 0.0  # FLIP: fraction of image patches dropped in training passes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="witforge train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--build", help="build YAML: its train: section, shard folder and eval sets")
    a("--train-data", nargs="+", metavar="SHARDS",
      help="shard folders, brace patterns (x-{000..009}.tar) or tar paths; several = sources "
           "mixed by --weights")
    a("--weights", nargs="+", type=float, help="sampling weight per --train-data source")
    a("--out", help="output folder (default runs/<build>/train)")
    a("--model", help="open_clip architecture, e.g. witforge-tiny, witforge-micro, ViT-B-32")
    a("--batch-size", type=int, help="samples per process per micro-batch")
    a("--epochs", type=int)
    a("--steps", type=int, help="optimizer steps (default: from --epochs and sizes.json)")
    a("--lr", type=float)
    a("--warmup", type=int, help="linear warmup steps before the cosine decay")
    a("--weight-decay", "--wd", dest="weight_decay", type=float)
    a("--accum-freq", type=int, help="micro-batches per optimizer step")
    a("--grad-clip", type=float, help="max gradient norm (0 = off)")
    a("--precision", choices=sorted(PRECISIONS))
    a("--loss", choices=["clip", "siglip"])
    a("--workers", type=int, help="DataLoader worker processes per rank (default 2; 0 = in "
      "process; 0 and 1 give the same batches)")
    a("--worker-priority", choices=WORKER_PRIORITY_CHOICES,
      help="CPU priority of loader workers: idle = only cycles the training step leaves "
           "free (auto's choice on the CPU), low = nice 10, normal (auto's choice on GPUs)")
    a("--save-every", type=int, help="checkpoint every N steps (and at the end)")
    a("--keep", type=int, help="step checkpoints kept (older ones are deleted)")
    a("--seed", type=int)
    a("--resume", help="'latest' or a checkpoint path; continues step, optimizer and data")
    a("--stop-at", type=int, help="stop after this step without changing the schedule")
    a("--no-resampled", dest="resampled", action="store_false", default=None,
      help="epoch mode: passes over the shards instead of independent rounds of all shards "
           "per loader process")
    a("--shuffle-buffer", type=int, help="samples in each shuffle buffer (0 = keep order)")
    a("--split", choices=["auto", "shard", "sample"],
      help="split the data across ranks/workers by shard or by sample")
    a("--no-augment", action="store_true", default=None,
      help="train with the eval preprocess (no random crop)")
    a("--eval-every", type=int, help="with eval sets: also evaluate every N steps (always at "
      "the end)")
    a("--zeroshot", nargs="+", help="zero-shot classification sets (CLIP_benchmark layout)")
    a("--retrieval", nargs="+", help="retrieval sets (CLIP_benchmark layout)")
    a("--templates", choices=["openai", "simple", "dataset"])
    a("--threads", type=int, help="torch threads per process (0 = torch's default); 1 is "
      "fastest on a busy machine")
    a("--grad-checkpointing", action="store_true", default=None,
      help="recompute each transformer block in the backward pass instead of storing its "
           "activations: less memory, ~1/3 more compute, the same gradients")
    a("--patch-dropout", type=float, metavar="P",
      help="FLIP: drop this fraction of image patches in training forward passes (0 = off; "
           "eval always sees every patch)")
    return p


def options_from_build(cfg: Any) -> TrainOptions:
    """A build's train: and eval: sections, training on its shard folder into runs/<build>/train."""
    from pipeline.stage import get_spec, stage_dir

    o = TrainOptions()
    for f in dataclasses.fields(cfg.train):
        if hasattr(o, f.name):
            setattr(o, f.name, getattr(cfg.train, f.name))
    o.train_data = [str(stage_dir(cfg, get_spec("shard")))]
    o.out = str(cfg.run_dir / "train")
    o.zeroshot = [str(cfg.resolve(p)) for p in cfg.eval.zeroshot]
    o.retrieval = [str(cfg.resolve(p)) for p in cfg.eval.retrieval]
    o.templates = cfg.eval.templates
    return o


def parse_options(argv: list[str]) -> TrainOptions:
    args = _parser().parse_args(argv)
    o = TrainOptions()
    if args.build:
        from pipeline.config import load_build

        o = options_from_build(load_build(args.build))
    for key, value in vars(args).items():
        if key != "build" and value is not None:
            setattr(o, key, value)
    if not o.train_data:
        raise SystemExit("witforge train: give --build or --train-data")
    if not o.out:
        raise SystemExit("witforge train: give --build or --out")
    if o.precision not in PRECISIONS:
        raise SystemExit(f"witforge train: precision {o.precision!r} is not one of "
                         f"{sorted(PRECISIONS)}")
    o.precision = PRECISIONS[o.precision]
    if o.weights and len(o.weights) != len(o.train_data):
        raise SystemExit("witforge train: give one --weights value per --train-data source")
    if o.accum_freq < 1 or o.batch_size < 1 or o.save_every < 1:
        raise SystemExit("witforge train: --batch-size, --accum-freq, --save-every must be >= 1")
    if o.workers < 0:
        raise SystemExit("witforge train: --workers must be >= 0")
    if not 0 <= o.patch_dropout < 1:
        raise SystemExit(f"witforge train: --patch-dropout (train.patch_dropout) must be in "
                         f"[0, 1), not {o.patch_dropout:g}")
    return o
