"""open_clip models by name, plus witforge's tiny configs that train on a CPU.

The tiny configs are JSON files in ``training/model_configs/`` registered with
``open_clip.add_model_config`` when this module is imported, so any code that has
imported ``training.model`` can call ``open_clip.create_model_and_transforms("witforge-tiny",
pretrained="runs/x/train/model.pt")`` exactly as it would for a built-in architecture.

Nothing here loads from a hub: a ``pretrained`` value must be a local file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterator
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
    patch_dropout: float = 0.0,
) -> tuple[torch.nn.Module, Any, Any, Any]:
    """Model, train preprocess, eval preprocess, tokenizer for ``arch``.

    ``pretrained`` must be a local checkpoint file (ours, or any open_clip state dict).
    SigLIP training needs the learnable bias, initialised as in the SigLIP paper
    (scale 10, bias -10); CLIP uses open_clip's default scale 1/0.07. ``patch_dropout``
    overrides the config's ``vision_cfg.patch_dropout`` (FLIP; active in train mode only).
    """
    check_arch(arch)
    if pretrained and not Path(pretrained).is_file():
        raise ValueError(f"checkpoint {pretrained} not found (only local files can be loaded)")
    kwargs: dict[str, Any] = {}
    if loss == "siglip":
        kwargs = {"init_logit_scale": float(np.log(10)), "init_logit_bias": -10.0}
    if patch_dropout:
        kwargs["force_patch_dropout"] = patch_dropout
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


# -- any local checkpoint, for inference (the embed stage) -----------------------------------
# Entries of OpenAI's released state dicts that are not weights (build_model_from_openai_state_dict
# reads them); their presence also says the weights were trained with QuickGELU.
OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def read_state_dict(path: Path, key: str = "embed.checkpoint") -> tuple[dict[str, Any], dict]:
    """(state dict, facts about the file) from the formats real releases use: OpenAI's
    TorchScript ``.pt`` and plain state dicts, open_clip's ``open_clip_pytorch_model.bin`` or
    ``.safetensors``, training checkpoints ``{"state_dict": ..., "epoch": ...}`` (with DDP's
    ``module.`` prefix), and witforge's ``train/model.pt``."""
    if not path.is_file():
        raise ValueError(f"{key}: {path} not found (only local files are loaded; nothing is "
                         "downloaded)")
    facts: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except SafetensorError as e:
            raise ValueError(f"{key}: {path} is not a readable safetensors file ({e})") from e
        facts["format"] = "safetensors state dict"
    elif _is_torchscript(path):
        # OpenAI's releases are TorchScript archives (torch.load refuses them with weights_only)
        obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        facts["format"] = "TorchScript archive (OpenAI release)"
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        # torch's unpickler fails on foreign bytes with whatever the bytes trip (IndexError
        # on a text file, UnpicklingError, EOFError, RuntimeError on a foreign zip...)
        except Exception as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"{key}: {path} is not a checkpoint torch can read as weights ({first}); "
                "expected an open_clip / OpenAI / LAION weights file or a witforge "
                "train/model.pt") from e
        facts["format"] = "state dict"
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            facts["format"] = ("witforge train/model.pt" if "arch" in obj
                               else "training checkpoint {state_dict: ...}")
            facts["trained_as"] = obj.get("arch")
            obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{key}: {path} holds a {type(obj).__name__}, not a state dict of "
                         "tensors (expected model weights)")
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ValueError(f"{key}: {path}: entry {bad!r} is a {type(obj[bad]).__name__}, not a "
                         "tensor: this is not a state dict of model weights")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    facts["openai"] = any(k in obj for k in OPENAI_EXTRAS)
    for k in OPENAI_EXTRAS:
        obj.pop(k, None)
    return obj, facts


def _examples(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def fit_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], arch: str, path: Path,
                   key: str = "embed.checkpoint", trained_as: str | None = None) -> None:
    """Load ``sd`` into ``model`` strictly after open_clip's own format conversions; a
    mismatch raises naming the key, the file, and the missing/unexpected/misshapen entries."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    sd = convert_state_dict(model, dict(sd))
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    own = model.state_dict()
    if "logit_scale" in sd and "logit_scale" in own and sd["logit_scale"].ndim != own[
            "logit_scale"].ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(own["logit_scale"].shape)
    # logit_bias (SigLIP) only enters the loss, never an embedding
    if "logit_bias" not in own:
        sd.pop("logit_bias", None)
    elif "logit_bias" not in sd:
        sd["logit_bias"] = torch.zeros_like(own["logit_bias"])
    if "text.transformer.embeddings.position_ids" not in own:
        sd.pop("text.transformer.embeddings.position_ids", None)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        why = []
        if missing:
            why.append(f"{len(missing)} missing keys such as {_examples(missing)}")
        if unexpected:
            why.append(f"{len(unexpected)} unexpected such as {_examples(unexpected)}")
        if shapes:
            k = shapes[0]
            why.append(f"{len(shapes)} with another shape, e.g. {k} is "
                       f"{list(sd[k].shape)} in the file but {list(own[k].shape)} in {arch}")
        hint = (f" (the file says it was trained as {trained_as})"
                if trained_as and trained_as != arch else "")
        raise ValueError(f"{key}: the state dict in {path} does not fit {arch}{hint}: "
                         + "; ".join(why))
    model.load_state_dict(sd, strict=True)


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs 'No pretrained weights loaded ... initialized randomly' when a model is
    created without weights; here the weights are loaded right after, so the warning is
    wrong (logging's last-resort handler would print it on stderr)."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _create_for(model: str, quick_gelu: bool) -> tuple[torch.nn.Module, Any, Any, dict]:
    if not model.endswith(".json"):
        with _quiet_open_clip():
            net, _, pre = open_clip.create_model_and_transforms(
                model, force_quick_gelu=quick_gelu, pretrained_text=False)
        cfg = open_clip.get_model_config(model)
        return net, pre, open_clip.get_tokenizer(model), {
            "architecture": model, "dim": cfg["embed_dim"],
            "quick_gelu": bool(quick_gelu or cfg.get("quick_gelu"))}
    path = Path(model)
    if not path.is_file():
        raise ValueError(f"embed.model: model config {path} not found")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"embed.model: {path} is not a JSON model config ({e})") from e
    cfg = raw.get("model_cfg", raw) if isinstance(raw, dict) else None
    if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
        raise ValueError(f"embed.model: {path} is not an open_clip model config (expected "
                         "embed_dim, vision_cfg and text_cfg, or an open_clip_config.json "
                         "with model_cfg)")
    # open_clip reads a config that is not registered only from a local-dir folder; a private
    # temporary one keeps the global registry untouched
    with tempfile.TemporaryDirectory(prefix="witforge-model-") as d:
        (Path(d) / "open_clip_config.json").write_text(json.dumps(
            {"model_cfg": cfg, "preprocess_cfg": raw.get("preprocess_cfg", {})}))
        with _quiet_open_clip():
            net, _, pre = open_clip.create_model_and_transforms(
                f"local-dir:{d}", force_quick_gelu=quick_gelu, pretrained_text=False)
            tok = open_clip.get_tokenizer(f"local-dir:{d}")
    return net, pre, tok, {"architecture": str(path), "model_config_sha256": file_sha256(path),
                           "dim": cfg["embed_dim"],
                           "quick_gelu": bool(quick_gelu or cfg.get("quick_gelu"))}


def load_embedding_model(model: str, checkpoint: str | Path
                         ) -> tuple[torch.nn.Module, Any, Any, dict[str, Any]]:
    """(model in eval mode on the CPU, eval preprocess, tokenizer, facts for a manifest) for an
    architecture name or model config JSON and a local weights file. OpenAI's weights were
    trained with QuickGELU: when the file is OpenAI's and the config does not say quick_gelu,
    it is forced (as open_clip's own OpenAI loader does) and the facts say so."""
    if model.startswith(("hf-hub:", "local-dir:")):  # open_clip would fetch the config first
        raise ValueError(f"embed.model: {model!r}: hub and local-dir models are refused (nothing "
                         "is downloaded); give an open_clip architecture name such as "
                         "ViT-B-32 or a model config JSON path, and the weights file in "
                         "embed.checkpoint")
    if not model.endswith(".json"):
        try:
            check_arch(model)
        except ValueError as e:
            raise ValueError(f"embed.model: {e}") from None
    path = Path(checkpoint)
    sd, facts = read_state_dict(path)
    named = open_clip.get_model_config(model) if not model.endswith(".json") else None
    force = bool(facts["openai"]) and not (named or {}).get("quick_gelu", False)
    net, pre, tok, info = _create_for(model, force)
    fit_state_dict(net, sd, info["architecture"], path, trained_as=facts.get("trained_as"))
    net.eval()
    info.update(checkpoint=str(path), checkpoint_sha256=file_sha256(path),
                checkpoint_format=facts["format"], quick_gelu_forced=force,
                preprocess=dict(net.visual.preprocess_cfg))
    return net, pre, tok, info
