"""Linear probe: logistic regression on a checkpoint's frozen image features.

As the CLIP paper (§3.2, appendix A.3) does it: L2-normalised image embeddings, scikit-learn's
L-BFGS logistic regression, the inverse regularisation C chosen on a validation part of the
train split (a log sweep), then refit on the whole train split and scored once on the test
split. Sets use CLIP_benchmark's layout with both splits (``<set>/train/*.tar``,
``<set>/test/*.tar``, ``.cls`` labels), which its ``linear_probe`` task reads too. At the demo's
scale the probe shows representation quality that zero-shot cannot: it needs no text tower to
line up with class names.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.evaluate import classification_metrics, samples_of

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


@torch.no_grad()
def image_features(model, preprocess, set_dir: Path, split: str, device="cpu",
                   batch_size: int = 128) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(features [n, dim] float32, labels [n], keys) of one split of a classification set."""
    from training.evaluate import _encode_images, _image

    feats, labels, keys, batch = [], [], [], []
    for s in samples_of(set_dir, split):
        if "cls" not in s:
            raise ValueError(f"{set_dir}/{split}: sample {s['__key__']} has no .cls label")
        batch.append(_image(s, set_dir))
        labels.append(int(s["cls"].decode().strip()))
        keys.append(s["__key__"])
        if len(batch) == batch_size:
            feats.append(_encode_images(model, preprocess, batch, device))
            batch = []
    if batch:
        feats.append(_encode_images(model, preprocess, batch, device))
    return torch.cat(feats).numpy(), np.array(labels), keys


def _validation_mask(keys: list[str], fraction: float = 0.2) -> np.ndarray:
    """A fixed fifth of the train split (by a hash of the key) picks C."""
    return np.array([int(hashlib.md5(k.encode()).hexdigest()[:8], 16) % 1000 < 1000 * fraction
                     for k in keys])


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, keys: list[str],
              grid: tuple[float, ...] = C_GRID) -> tuple[Any, float, dict[float, float]]:
    """(fitted classifier on all of train, chosen C, validation accuracy per C)."""
    from sklearn.linear_model import LogisticRegression

    val = _validation_mask(keys)
    if val.all() or not val.any() or len(set(y_train[~val])) < 2:
        val = np.zeros(len(y_train), dtype=bool)  # too small to hold out: C = 1
    scores: dict[float, float] = {}
    if val.any():
        for c in grid:
            clf = LogisticRegression(C=c, max_iter=1000)
            clf.fit(x_train[~val], y_train[~val])
            scores[c] = float((clf.predict(x_train[val]) == y_train[val]).mean())
        best = max(grid, key=lambda c: (scores[c], -abs(np.log10(c))))
    else:
        best = 1.0
    clf = LogisticRegression(C=best, max_iter=1000)
    clf.fit(x_train, y_train)
    return clf, best, scores


def linear_probe(model, preprocess, set_dir: Path, device="cpu") -> dict[str, Any]:
    """Probe accuracy on ``set_dir``'s test split, trained on its train split."""
    set_dir = Path(set_dir)
    if not (set_dir / "train").is_dir():
        raise ValueError(f"{set_dir}: no train/ split (a linear probe needs train and test)")
    x_tr, y_tr, keys = image_features(model, preprocess, set_dir, "train", device)
    x_te, y_te, _ = image_features(model, preprocess, set_dir, "test", device)
    clf, c, val_scores = fit_probe(x_tr, y_tr, keys)
    logits = torch.from_numpy(clf.decision_function(x_te)).float()
    if logits.ndim == 1:  # two classes: one column of scores
        logits = torch.stack([-logits, logits], dim=1)
    # decision_function's columns are clf.classes_; map them back to the label ids
    full = torch.full((len(y_te), int(max(y_tr.max(), y_te.max())) + 1), float("-inf"))
    full[:, torch.from_numpy(clf.classes_.astype(np.int64))] = logits
    result = classification_metrics(full, torch.from_numpy(y_te))
    result.update(task="linear_probe", dataset=set_dir.name, train=len(y_tr), C=c,
                  validation_accuracy={str(k): v for k, v in val_scores.items()},
                  chance_top1=1.0 / len(set(y_tr.tolist()) | set(y_te.tolist())))
    return result
