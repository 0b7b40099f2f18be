"""Several processes on one or more machines: who am I, on which device, and a resume that
every rank agrees on.

torchrun sets RANK (global: 0..WORLD_SIZE-1 over all machines), LOCAL_RANK (0..nproc_per_node-1
on this machine) and WORLD_SIZE. The global rank decides what a process *does*: which loader
slots it reads (``rank * workers + role``, the same on one machine × 2 processes as on 2
machines × 1 process) and whether it writes (only global rank 0 writes checkpoints, metrics,
plots and the final model). The local rank decides only *where* it runs: its GPU.

Machines need not share a file system: on resume every rank looks in its own checkpoint
folder, the newest step found anywhere wins, and a rank that lacks it gets a copy over the
process group instead of silently starting afresh (``load_resume``). Metrics and the final
model are then where global rank 0 ran: put runs/ on a shared file system to have them in
one place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from training import checkpoint as ckpt


@dataclass
class Dist:
    rank: int  # global rank: the data it reads, and whether it writes
    world: int
    local_rank: int  # rank on this machine: its GPU
    local_world: int  # processes on this machine
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.world // max(1, self.local_world))


def setup() -> Dist:
    """Join torchrun's process group (gloo on the CPU, NCCL on GPUs) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world > 1 and "RANK" not in os.environ:
        raise ValueError("WORLD_SIZE is set but RANK is not: start several processes with "
                         "torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT)")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)  # GPUs are numbered per machine
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return Dist(rank, world, local_rank, local_world, device)


def load_resume(value: str | None, ckpt_dir: Path, d: Dist) -> tuple[Path | None, dict | None]:
    """(checkpoint path, its state) every rank agrees on, or (None, None) for a fresh start.

    Every rank looks in its own checkpoint folder: machines need not share a disk, and c10d's
    rendezvous may give global rank 0 (the writer) to another machine than last time. The
    newest step any rank found wins; a rank that holds another step, or none, gets the state
    from the lowest rank holding the winner. With a shared disk every rank reads the same file
    and nothing goes over the network. A checkpoint that is there but unreadable is an error
    on every rank (no rank waits forever for one that gave up), never a silent fresh start."""
    if d.world == 1:
        path = ckpt.resolve_resume(value, ckpt_dir)
        return path, (ckpt.load(path) if path is not None else None)
    state, found, error, failure = None, None, None, None
    try:
        found = ckpt.resolve_resume(value, ckpt_dir)
    except ValueError:  # an explicit --resume PATH that only another machine has
        found = None
    if found is not None:
        try:
            state = ckpt.load(found)
        except Exception as e:  # re-raised below, once every rank knows
            failure, error = e, f"rank {d.rank} cannot read {found} ({type(e).__name__}: {e})"
    mine = (int(state["step"]) if state is not None else None,
            str(found) if state is not None else None, error)
    views: list[Any] = [None] * d.world
    dist.all_gather_object(views, mine)
    errors = [v[2] for v in views if v[2]]
    if errors:
        if failure is not None:
            raise failure
        raise ValueError("; ".join(errors))
    held = [(step, -r) for r, (step, _, _) in enumerate(views) if step is not None]
    if not held:
        if value and value != "latest":
            raise ValueError(f"--resume {value}: no such checkpoint on any machine")
        return None, None
    best, src = max(held)[0], -max(held)[1]
    if any(step != best for step, _, _ in views):
        box = [state if d.rank == src else None]
        dist.broadcast_object_list(box, src=src)  # torchrun's group: src is a global rank
        state = box[0]
    return Path(views[src][1]), state
