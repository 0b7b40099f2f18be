"""`witforge evaluate`: zero-shot classification and image-text retrieval of a checkpoint.

Eval sets use CLIP_benchmark's webdataset layout:

    <set>/classnames.txt                         one class name per line (classification)
    <set>/zeroshot_classification_templates.txt  optional, one "{c}" template per line
    <set>/test/*.tar                             <key>.webp|png|jpg + <key>.cls (class index)
                                                 or <key>.txt (captions, one per line: retrieval)

Zero-shot classifiers are built from class names through prompt templates with open_clip's
``build_zero_shot_classifier`` (OpenAI's 80 ImageNet templates, the short "simple" set, or the
set's own file); results are written as one JSON per set and task.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from open_clip import (
    OPENAI_IMAGENET_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
    build_zero_shot_classifier,
)
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from pipeline.progress import progress

IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")


# -- metrics on plain tensors (tested on hand-made inputs) -----------------------------------
def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top-1, top-5 accuracy and mean per-class recall (balanced accuracy)."""
    n_classes = logits.shape[1]
    top = logits.topk(min(5, n_classes), dim=1).indices
    hit1 = top[:, 0] == labels
    hit5 = (top == labels[:, None]).any(dim=1)
    # counts over n in Python floats, as CLIP_benchmark and scikit-learn compute them, so both
    # tools print the very same numbers (a float32 mean differs in the 9th digit)
    n = int(labels.numel())
    recalls = [int(hit1[labels == c].sum()) / int((labels == c).sum())
               for c in labels.unique().tolist()]
    return {"top1": int(hit1.sum()) / n, "top5": int(hit5.sum()) / n,
            "mean_per_class_recall": sum(recalls) / len(recalls), "n": int(labels.numel())}


def retrieval_metrics(sim: torch.Tensor, text_to_image: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K both ways from an [images x texts] similarity matrix; ``text_to_image[t]`` is
    the index of the image caption t belongs to (an image may have several captions).
    image->text: an image counts when any of its captions is among its K best texts."""
    n_img, n_txt = sim.shape
    positives = torch.zeros(n_img, n_txt, dtype=torch.bool)
    positives[text_to_image, torch.arange(n_txt)] = True
    out: dict[str, float] = {}
    for k in ks:
        top_t = sim.topk(min(k, n_txt), dim=1).indices
        out[f"image_to_text_R@{k}"] = positives.gather(1, top_t).any(1).float().mean().item()
        top_i = sim.t().topk(min(k, n_img), dim=1).indices
        out[f"text_to_image_R@{k}"] = (top_i == text_to_image[:, None]).any(1).float().mean()\
            .item()
    return out


# -- reading eval sets ------------------------------------------------------------------------
def samples_of(set_dir: Path, split: str = "test") -> Iterator[dict]:
    """The samples of one split (``<set>/<split>/*.tar``), in tar order."""
    tars = sorted((set_dir / split).glob("*.tar"))
    if not tars:
        raise ValueError(f"{set_dir}: no {split}/*.tar (expected CLIP_benchmark's layout)")
    def raise_error(exn: Exception) -> bool:
        raise ValueError(f"{set_dir}: unreadable eval shard: {exn}") from exn
    files = tar_file_expander(url_opener([{"url": str(t)} for t in tars], handler=raise_error),
                              handler=raise_error)
    yield from group_by_keys(files, handler=raise_error)


def _image(sample: dict, set_dir: Path) -> Image.Image:
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise ValueError(f"{set_dir}: sample {sample['__key__']} has no image")
    return Image.open(io.BytesIO(sample[key])).convert("RGB")


def templates_for(set_dir: Path, which: str) -> list:
    """Prompt templates: ``dataset`` = the set's own zeroshot_classification_templates.txt (what
    CLIP_benchmark uses for a webdataset set; OpenAI's 80 when the set has none), ``openai`` =
    OpenAI's 80 ImageNet templates, ``simple`` = open_clip's short set. File templates name the
    class ``{c}`` as CLIP_benchmark formats them (``t.format(c=name)``); open_clip's classifier
    builder formats strings positionally, so they are handed over as callables."""
    own = set_dir / "zeroshot_classification_templates.txt"
    if which == "dataset" and own.is_file():
        lines = [t.strip() for t in own.read_text().splitlines() if t.strip()]
        return [functools.partial(_fill, t) for t in lines]
    if which == "simple":
        return list(SIMPLE_IMAGENET_TEMPLATES)
    return list(OPENAI_IMAGENET_TEMPLATES)


def _fill(template: str, classname: str) -> str:
    return template.format(c=classname)


def _encode_images(model, preprocess, images: list[Image.Image], device) -> torch.Tensor:
    x = torch.stack([preprocess(im) for im in images]).to(device)
    return model.encode_image(x, normalize=True).float().cpu()


# -- tasks ------------------------------------------------------------------------------------
@torch.no_grad()
def zero_shot(model, preprocess, tokenizer, set_dir: Path, templates: str = "openai",
              device="cpu", batch_size: int = 128) -> dict[str, Any]:
    set_dir = Path(set_dir)
    names_file = set_dir / "classnames.txt"
    if not names_file.is_file():
        raise ValueError(f"{set_dir}: classnames.txt missing, not a classification set")
    classnames = [c.strip() for c in names_file.read_text().splitlines() if c.strip()]
    prompts = templates_for(set_dir, templates)
    classifier = build_zero_shot_classifier(model, tokenizer, classnames, prompts,
                                            device=device).float().cpu()
    feats, labels, batch = [], [], []
    for s in samples_of(set_dir):
        if "cls" not in s:
            raise ValueError(f"{set_dir}: sample {s['__key__']} has no .cls label")
        batch.append(_image(s, set_dir))
        labels.append(int(s["cls"].decode().strip()))
        if len(batch) == batch_size:
            feats.append(_encode_images(model, preprocess, batch, device))
            batch = []
    if batch:
        feats.append(_encode_images(model, preprocess, batch, device))
    logits = 100.0 * torch.cat(feats) @ classifier
    result = classification_metrics(logits, torch.tensor(labels))
    result.update(task="zeroshot_classification", dataset=set_dir.name,
                  classes=len(classnames), templates=len(prompts),
                  chance_top1=1.0 / len(classnames))
    return result


@torch.no_grad()
def retrieval(model, preprocess, tokenizer, set_dir: Path, device="cpu",
              batch_size: int = 128) -> dict[str, Any]:
    set_dir = Path(set_dir)
    img_feats, txt_feats, owner, images, texts = [], [], [], [], []

    def flush() -> None:
        if images:
            img_feats.append(_encode_images(model, preprocess, images, device))
            images.clear()
        if texts:
            tok = tokenizer(texts).to(device)
            txt_feats.append(model.encode_text(tok, normalize=True).float().cpu())
            texts.clear()

    n_images = 0
    for s in samples_of(set_dir):
        captions = [c for c in s.get("txt", b"").decode("utf-8").splitlines() if c.strip()]
        if not captions:
            raise ValueError(f"{set_dir}: sample {s['__key__']} has no caption (.txt)")
        images.append(_image(s, set_dir))
        texts.extend(captions)
        owner.extend([n_images] * len(captions))
        n_images += 1
        if len(images) >= batch_size:
            flush()
    flush()
    sim = torch.cat(img_feats) @ torch.cat(txt_feats).t()
    result = retrieval_metrics(sim, torch.tensor(owner))
    result.update(task="zeroshot_retrieval", dataset=set_dir.name, images=n_images,
                  texts=len(owner), chance_R1=1.0 / n_images)
    return result


def evaluate_sets(model, preprocess, tokenizer, zeroshot_sets: list[str],
                  retrieval_sets: list[str], templates: str = "openai",
                  device="cpu") -> dict[str, float]:
    """Headline numbers of every set, flat: {"<set>/top1": ..., "<set>/i2t_R@1": ...}."""
    scores: dict[str, float] = {}
    for d in zeroshot_sets:
        r = zero_shot(model, preprocess, tokenizer, Path(d), templates, device)
        scores[f"{Path(d).name}/top1"] = r["top1"]
    for d in retrieval_sets:
        r = retrieval(model, preprocess, tokenizer, Path(d), device)
        scores[f"{Path(d).name}/i2t_R@1"] = r["image_to_text_R@1"]
        scores[f"{Path(d).name}/t2i_R@1"] = r["text_to_image_R@1"]
    return scores


# -- CLI --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="witforge evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", help="build YAML: eval sets from eval:, checkpoint from "
                   "runs/<build>/train/model.pt, results to runs/<build>/eval/")
    p.add_argument("--checkpoint", help="model checkpoint (ours or any open_clip state dict)")
    p.add_argument("--model", help="architecture (default: the build's train.model)")
    p.add_argument("--zeroshot", nargs="+", default=None, help="classification set folders")
    p.add_argument("--retrieval", nargs="+", default=None, help="retrieval set folders")
    p.add_argument("--templates", choices=["openai", "simple", "dataset"], default=None)
    p.add_argument("--out", help="folder for the result JSONs")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    from training.model import load_for_inference

    zs, rt, templates, model, ckpt_path, out = [], [], "dataset", "witforge-tiny", None, None
    if a.build:
        from pipeline.config import load_build

        cfg = load_build(a.build)
        zs = [str(cfg.resolve(x)) for x in cfg.eval.zeroshot]
        rt = [str(cfg.resolve(x)) for x in cfg.eval.retrieval]
        templates, model = cfg.eval.templates, cfg.train.model
        ckpt_path, out = cfg.run_dir / "train" / "model.pt", cfg.run_dir / "eval"
    zs = a.zeroshot if a.zeroshot is not None else zs
    rt = a.retrieval if a.retrieval is not None else rt
    templates, model = a.templates or templates, a.model or model
    ckpt_path = Path(a.checkpoint) if a.checkpoint else ckpt_path
    out = Path(a.out) if a.out else out
    if ckpt_path is None or out is None:
        p.error("give --build, or --checkpoint and --out")
    if not zs and not rt:
        p.error("no eval sets: give --zeroshot/--retrieval or list them in the build's eval:")
    try:
        net, preprocess, tokenizer = load_for_inference(model, ckpt_path)
        out.mkdir(parents=True, exist_ok=True)
        results = []
        for d in progress(zs + rt, desc="evaluate", unit="set"):
            if d in zs:
                r = zero_shot(net, preprocess, tokenizer, Path(d), templates)
            else:
                r = retrieval(net, preprocess, tokenizer, Path(d))
            r.update(checkpoint=str(ckpt_path), model=model)
            (out / f"{Path(d).name}_{r['task']}.json").write_text(json.dumps(r, indent=1))
            results.append(r)
    except ValueError as e:
        print(f"witforge evaluate: error: {e}", file=sys.stderr)
        return 2
    for r in results:
        if r["task"] == "zeroshot_classification":
            print(f"{r['dataset']:<28} top1 {r['top1']:.3f}  top5 {r['top5']:.3f}  "
                  f"mean-recall {r['mean_per_class_recall']:.3f}  (chance {r['chance_top1']:.3f})")
        else:
            print(f"{r['dataset']:<28} i2t R@1/5/10 {r['image_to_text_R@1']:.3f}/"
                  f"{r['image_to_text_R@5']:.3f}/{r['image_to_text_R@10']:.3f}  t2i R@1/5/10 "
                  f"{r['text_to_image_R@1']:.3f}/{r['text_to_image_R@5']:.3f}/"
                  f"{r['text_to_image_R@10']:.3f}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
