"""open_clip models by name, plus witforge's tiny configs that train on a CPU.

The tiny configs are JSON files in ``training/model_configs/`` registered with
``open_clip.add_model_config`` when this module is imported, so any code that has
imported ``training.model`` can call ``open_clip.create_model_and_transforms("witforge-tiny",
pretrained="runs/x/train/model.pt")`` exactly as it would for a built-in architecture.

Nothing here loads from a hub: a ``pretrained`` value must be a local file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_MODELS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not set(TINY_MODELS) <= set(open_clip.list_models()):
    open_clip.add_model_config(CONFIG_DIR)


def check_arch(arch: str) -> None:
    """Raise ValueError naming the known architectures if ``arch`` is not one of them."""
    if arch.startswith(("hf-hub:", "local-dir:")) or arch not in open_clip.list_models():
        known = ", ".join(TINY_MODELS) + " or an open_clip config such as ViT-B-32"
        raise ValueError(f"unknown model {arch!r}: use {known} (hub models are not available)")


def create(
    arch: str,
    pretrained: str | None = None,
    loss: str = "clip",
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> tuple[torch.nn.Module, Any, Any, Any]:
    """Model, train preprocess, eval preprocess, tokenizer for ``arch``.

    ``pretrained`` must be a local checkpoint file (ours, or any open_clip state dict).
    SigLIP training needs the learnable bias, initialised as in the SigLIP paper
    (scale 10, bias -10); CLIP uses open_clip's default scale 1/0.07.
    """
    check_arch(arch)
    if pretrained and not Path(pretrained).is_file():
        raise ValueError(f"checkpoint {pretrained} not found (only local files can be loaded)")
    kwargs: dict[str, Any] = {}
    if loss == "siglip":
        kwargs = {"init_logit_scale": float(np.log(10)), "init_logit_bias": -10.0}
    model, train_pre, eval_pre = open_clip.create_model_and_transforms(
        arch, pretrained=pretrained, device=device, precision=precision, **kwargs
    )
    tokenizer = open_clip.get_tokenizer(arch)
    return model, train_pre, eval_pre, tokenizer


def load_for_inference(arch: str, checkpoint: str | Path, device: str = "cpu"):
    """(model in eval mode, eval preprocess, tokenizer) from a local checkpoint."""
    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise ValueError(f"checkpoint {ckpt} not found")
    loss = "clip"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    sd = state.get("state_dict", state) if isinstance(state, dict) else state
    if any(k.endswith("logit_bias") for k in sd):
        loss = "siglip"
    model, _, eval_pre, tokenizer = create(arch, pretrained=str(ckpt), loss=loss, device=device)
    model.eval()
    return model, eval_pre, tokenizer
