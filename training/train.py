"""`witforge train`: contrastive training of an open_clip model on WebDataset shards.

Read top to bottom: options -> distributed setup -> model, optimizer, schedule -> resume ->
loader -> the loop (accumulate, step, clamp, log, checkpoint, eval) -> final model and plot.

Single process:  witforge train --train-data runs/demo/14_shard --model witforge-tiny --steps 50
Several (CPU, gloo; GPUs, NCCL):  torchrun --nproc_per_node 2 -m training.train --train-data ...
Several machines: torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint
  HOST:PORT ... on each (recipes/slurm_train.sbatch); the global rank picks the data, only
  global rank 0 writes (training/distributed.py).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss, SigLipLoss
from open_clip.transformer import PatchDropout

from pipeline.progress import progress
from training import checkpoint as ckpt
from training import distributed
from training.data import LoaderConfig, LoaderPosition, make_loader, steps_per_epoch
from training.model import create
from training.options import TrainOptions, parse_options
from training.plot import plot_metrics

MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the temperature so logits stay <= 100


# -- building blocks -------------------------------------------------------------------------
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on gains (norm weights), biases, embeddings of rank < 2
    and logit_scale/logit_bias — decaying those only pulls them towards zero for no benefit."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "bias" in name or "ln" in name or "logit_scale" in name
        (no_decay if exempt else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def make_optimizer(groups: list[dict[str, Any]], lr: float,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for the device (CPU and CUDA): one
    call per step instead of a dozen tensor ops per parameter (bench: optimizer step 125 ->
    10 ms for witforge-tiny on 2 cores)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=fused or None)


def cosine_with_warmup(warmup: int, total: int):
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at ``total`` steps."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def autocast_for(precision: str, device: torch.device):
    """bf16/fp16 autocast where the device supports it; fp32 means none."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def split_output(out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if isinstance(out, dict):
        return (out["image_features"], out["text_features"], out["logit_scale"],
                out.get("logit_bias"))
    return out[0], out[1], out[2], (out[3] if len(out) > 3 else None)


def train_step(model, loss_fn, micro_batches, autocast) -> torch.Tensor:
    """Forward + backward for one optimizer step. With several micro-batches the loss is still
    the loss over the whole batch (every pair against every other, as open_clip's accum_freq):
    features of all micro-batches are computed without gradient first, then each micro-batch
    is recomputed with gradient and put back in place before its backward pass."""
    if len(micro_batches) == 1:
        images, texts = micro_batches[0]
        with autocast():
            img, txt, scale, bias = split_output(model(images, texts))
            loss = loss_fn(img, txt, scale, bias)
        loss.backward()
        return loss.detach()
    with torch.no_grad(), autocast():
        cached = [split_output(model(i, t))[:2] for i, t in micro_batches]
    for j, (images, texts) in enumerate(micro_batches):
        with autocast():
            img_j, txt_j, scale, bias = split_output(model(images, texts))
            imgs = torch.cat([img_j if k == j else c[0] for k, c in enumerate(cached)])
            txts = torch.cat([txt_j if k == j else c[1] for k, c in enumerate(cached)])
            if j > 0:  # scale/bias enter the whole loss: their gradient is taken once
                scale = scale.detach()
                bias = bias.detach() if bias is not None else None
            loss = loss_fn(imgs, txts, scale, bias)
        loss.backward()
    return loss.detach()


def clamp_logit_scale(model: torch.nn.Module) -> None:
    """Keep exp(logit_scale) <= 100 after every optimizer step, as CLIP does."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def worker_priority(choice: str, device: torch.device) -> str:
    """``auto``: on the CPU the loader workers share the cores with the training step and
    take only its idle cycles (``training.data.set_worker_priority``); with a GPU the cores
    are the workers' own."""
    if choice != "auto":
        return choice
    return "idle" if device.type == "cpu" else "normal"


def batch_fingerprint(keys: list[str]) -> str:
    return hashlib.sha1("\n".join(keys).encode()).hexdigest()[:12]


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of one rank's optimizer step: random draws inside the forward pass
    (patch dropout's kept patches) are a function of (seed, rank, step), so a resumed run,
    or the same ranks on another machine layout, draws what the uninterrupted run drew."""
    h = hashlib.sha256(f"{seed}:train-step:{rank}:{step}".encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def build_model(o: TrainOptions, device: torch.device):
    """(model, train preprocess, eval preprocess, tokenizer) with the memory and compute
    savers open_clip users train big models with: gradient checkpointing (recompute each
    transformer block's activations in the backward pass instead of keeping them) and FLIP
    patch dropout (open_clip's vision_cfg.patch_dropout: the ViT sees a random
    1 - patch_dropout of its patches while training; model.eval() sees them all)."""
    model, train_pre, eval_pre, tokenizer = create(o.model, loss=o.loss, device=device,
                                                   patch_dropout=o.patch_dropout)
    if o.patch_dropout and not isinstance(getattr(model.visual, "patch_dropout", None),
                                          PatchDropout):
        raise ValueError(f"train.patch_dropout: {o.model}'s image tower is not a ViT "
                         "(no patches to drop); set it to 0")
    if o.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, train_pre, eval_pre, tokenizer


# -- the run ---------------------------------------------------------------------------------
def train(o: TrainOptions) -> dict[str, Any]:
    d = distributed.setup()
    rank, world, device, main_proc = d.rank, d.world, d.device, d.main
    out = Path(o.out)
    ckpt_dir = out / "checkpoints"
    metrics_path = out / "metrics.jsonl"

    # Same seed on every rank: DDP also broadcasts rank 0's weights, this keeps RNGs aligned.
    torch.manual_seed(o.seed)
    model, train_pre, eval_pre, tokenizer = build_model(o, device)
    preprocess = eval_pre if o.no_augment else train_pre
    optimizer = make_optimizer(param_groups(model, o.weight_decay), o.lr, device)
    if o.steps <= 0:
        o.steps = o.epochs * steps_per_epoch(o.train_data, o.batch_size * o.accum_freq, world,
                                             o.weights)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(o.warmup,
                                                                                 o.steps))
    scaler = torch.amp.GradScaler("cuda") if o.precision == "fp16" else None
    autocast = autocast_for(o.precision, device)

    # Resume: model, optimizer, schedule, step, and where this rank's data stream stood.
    # Rank 0 picks the checkpoint; machines without a shared disk get its copy.
    step, position = 0, LoaderPosition()
    resume_from, state = distributed.load_resume(o.resume, ckpt_dir, d)
    if state is not None:
        _check_layout(state, resume_from, o, world)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        position = LoaderPosition.from_dict(state["loader"][str(rank)])
        if main_proc:
            _truncate_metrics(metrics_path, step)
    elif main_proc and metrics_path.is_file():
        metrics_path.unlink()  # a fresh run must not plot on top of an earlier run's curve

    loader_cfg = LoaderConfig(
        sources=o.train_data, weights=o.weights, batch_size=o.batch_size, seed=o.seed,
        resampled=o.resampled, shuffle_buffer=o.shuffle_buffer, split=o.split,
        workers=o.workers, rank=rank, world_size=world,
        worker_priority=worker_priority(o.worker_priority, device))
    batches = iter(make_loader(loader_cfg, preprocess, tokenizer, copy.deepcopy(position)))

    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if o.loss == "siglip":
        loss_fn = SigLipLoss(rank=rank, world_size=world)
    else:
        # local_loss + gather_with_grad: each rank scores its own rows against the global
        # batch; the gradient equals the single-process one at a fraction of the memory.
        loss_fn = ClipLoss(local_loss=world > 1, gather_with_grad=world > 1,
                           rank=rank, world_size=world)

    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        (out / "options.json").write_text(json.dumps(o.to_dict(), indent=1))
    stop = min(o.steps, o.stop_at) if o.stop_at else o.steps
    bar = progress(total=stop, initial=step, desc="train", unit="step", disable=not main_proc,
                   dynamic_ncols=True)
    global_batch = o.batch_size * o.accum_freq * world
    t_run, seen_this_run = time.time(), 0
    last_loss = float("nan")
    ddp_model.train()
    while step < stop:
        t0 = time.time()
        micro, keys = [], []
        for _ in range(o.accum_freq):
            images, texts, info = next(batches)
            position.update(info)
            micro.append((images.to(device, non_blocking=True), texts.to(device)))
            keys += info["keys"]
        t_data = time.time() - t0

        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(step_seed(o.seed, rank, step))
        loss = train_step(ddp_model, loss_fn, micro, autocast)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip,
                                           foreach=device.type in ("cpu", "cuda") or None)
        (scaler.step(optimizer), scaler.update()) if scaler is not None else optimizer.step()
        scheduler.step()
        clamp_logit_scale(model)
        step += 1
        seen_this_run += global_batch

        if world > 1:  # logged loss = the global batch's loss (mean of the local losses)
            dist.all_reduce(loss)
            loss /= world
        last_loss = float(loss)
        if main_proc:
            row = {"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                   "logit_scale": float(model.logit_scale.detach().exp()),
                   "samples_seen": step * global_batch, "data_s": round(t_data, 4),
                   "step_s": round(time.time() - t0, 4), "skipped": sum(position.skipped.values()),
                   "batch": batch_fingerprint(keys)}
            _append(metrics_path, row)
            bar.set_postfix(loss=f"{last_loss:.3f}", skipped=row["skipped"])
        bar.update(1)

        if step % o.save_every == 0 or step == stop:
            _save(o, model, optimizer, scheduler, scaler, step, position, d, ckpt_dir)
        wants_eval = (o.eval_every and step % o.eval_every == 0) or step == stop
        if main_proc and (o.zeroshot or o.retrieval) and wants_eval:
            _evaluate(o, model, eval_pre, tokenizer, device, step, metrics_path)
    bar.close()

    elapsed = time.time() - t_run
    summary = {"steps": step, "target_steps": o.steps, "global_batch": global_batch,
               "world_size": world, "nodes": d.nodes, "final_loss": last_loss,
               "samples_per_s": seen_this_run / elapsed if elapsed > 0 else 0.0,
               "skipped_samples": dict(position.skipped), "out": str(out)}
    if main_proc:
        if step >= o.steps:
            ckpt.save_atomic({"state_dict": model.state_dict(), "arch": o.model,
                              "loss": o.loss, "step": step}, out / "model.pt")
            summary["model"] = str(out / "model.pt")
        if metrics_path.is_file():
            summary["plot"] = str(plot_metrics(metrics_path, out / "curves.png"))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if world > 1:
        dist.barrier()
    return summary


def _check_layout(state: dict, path: Path | None, o: TrainOptions, world: int) -> None:
    """Loader positions are per global rank and per worker role: a checkpoint carries over
    to any machine layout with the same process count and loader workers (2 machines x 1
    process = 1 machine x 2 processes), not to another count."""
    saved = len(state["loader"])
    if saved != world:
        raise ValueError(f"{path} was written by {saved} processes, this run has {world}: "
                         "the data position cannot be carried over")
    layout = state.get("layout", {})  # checkpoints before the layout was recorded have none
    roles = layout.get("worker_roles")
    if roles is not None and roles != max(1, o.workers):
        raise ValueError(f"{path} was written with {roles} loader worker(s) per process "
                         f"(--workers {roles}), this run has {max(1, o.workers)}: resume with "
                         f"--workers {roles} to continue the same data streams")


def _save(o, model, optimizer, scheduler, scaler, step, position, d, ckpt_dir) -> None:
    positions = [position.to_dict()]
    if d.world > 1:
        positions = [None] * d.world
        dist.all_gather_object(positions, position.to_dict())
    if not d.main:
        return  # only global rank 0 writes, whatever machine it is on
    state = {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "step": step, "arch": o.model, "loss": o.loss,
             "loader": {str(r): p for r, p in enumerate(positions)},
             "layout": {"world_size": d.world, "nodes": d.nodes,
                        "nproc_per_node": d.local_world, "worker_roles": max(1, o.workers)}}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    ckpt.save_atomic(state, ckpt_dir / f"step_{step:06d}.pt")
    ckpt.prune(ckpt_dir, o.keep)


def _evaluate(o, model, eval_pre, tokenizer, device, step, metrics_path) -> None:
    from training.evaluate import evaluate_sets  # only runs that evaluate pay the import

    model.eval()
    scores = evaluate_sets(model, eval_pre, tokenizer, o.zeroshot, o.retrieval,
                           templates=o.templates, device=device)
    model.train()
    _append(metrics_path, {"step": step, "eval": scores})


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows the interrupted run logged after its last checkpoint: they are redone."""
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    try:
        if opts.threads > 0:
            torch.set_num_threads(opts.threads)
        summary = train(opts)
    except ValueError as e:
        print(f"witforge train: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # main() may run inside a test process
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(summary, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
