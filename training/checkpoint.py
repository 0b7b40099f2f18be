"""Atomic training checkpoints that open_clip can load directly.

A checkpoint is a plain dict saved with torch.save: ``state_dict`` (the model, without DDP's
``module.`` prefix) is where ``open_clip.load_checkpoint`` looks, so
``open_clip.create_model_and_transforms(arch, pretrained="step_000100.pt")`` works; the rest
(optimizer, scheduler, step, loader position, arch) is for ``--resume``. Only tensors, numbers,
strings, lists and dicts go in, so ``torch.load(weights_only=True)`` accepts it.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import torch

STEP_RE = re.compile(r"step_(\d+)\.pt$")


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: a kill
    at any moment leaves either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # a full disk must not also keep half a checkpoint
        # torch reports a full disk as "RuntimeError: ... unexpected pos", the ENOSPC behind it
        if not isinstance(e, OSError) and getattr(e.__context__, "errno", 0) == errno.ENOSPC:
            raise OSError(errno.ENOSPC, "No space left on device writing a checkpoint",
                          str(path)) from e
        raise


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the finished checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_RE.search(p.name))]
    return sorted(found)


def resolve_resume(value: str | None, folder: Path) -> Path | None:
    """``latest`` -> the newest checkpoint in ``folder`` (None if there is none yet, so a
    first run with ``--resume latest`` simply starts); otherwise a checkpoint path."""
    if not value:
        return None
    if value == "latest":
        found = checkpoints(folder)
        return found[-1][1] if found else None
    p = Path(value)
    if not p.is_file():
        raise ValueError(f"--resume {value}: no such checkpoint")
    return p


def prune(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints."""
    for _, p in checkpoints(folder)[:-keep] if keep > 0 else []:
        p.unlink(missing_ok=True)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
