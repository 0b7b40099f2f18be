"""`witforge classify`: label probabilities for images, as in CLIP's README example.

    witforge classify --checkpoint runs/demo/train/model.pt --model witforge-tiny \\
        --labels "a diagram,a dog,a cat" image.png
    image.png  Label probs: [[0.9927937  0.00421068 0.00299572]]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image


def label_probs(model, preprocess, tokenizer, image: Image.Image,
                labels: list[str]) -> torch.Tensor:
    """Softmax over labels of 100 x cosine similarity (CLIP's fixed test-time temperature)."""
    with torch.no_grad():
        img = model.encode_image(preprocess(image).unsqueeze(0), normalize=True)
        txt = model.encode_text(tokenizer(labels), normalize=True)
        return (100.0 * img @ txt.T).softmax(dim=-1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="witforge classify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a local checkpoint file")
    p.add_argument("--model", default="witforge-tiny", help="its architecture")
    p.add_argument("--labels", required=True, help="comma-separated labels or prompts")
    p.add_argument("images", nargs="+", type=Path)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    labels = [x.strip() for x in a.labels.split(",") if x.strip()]
    if len(labels) < 2:
        p.error("--labels needs at least two comma-separated labels")
    from training.model import load_for_inference

    try:
        model, preprocess, tokenizer = load_for_inference(a.model, a.checkpoint)
    except ValueError as e:
        print(f"witforge classify: error: {e}", file=sys.stderr)
        return 2
    for path in a.images:
        try:
            image = Image.open(path)
        except OSError as e:
            print(f"witforge classify: error: {path}: not a readable image ({e})",
                  file=sys.stderr)
            return 2
        probs = label_probs(model, preprocess, tokenizer, image.convert("RGB"), labels)
        print(f"{path}  Label probs: {probs.numpy()}")
        best = probs[0].argmax().item()
        print(f"{path}  best: {labels[best]} ({probs[0, best].item():.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
