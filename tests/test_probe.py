"""The linear probe on frozen image features: train/test splits in CLIP_benchmark's layout,
C picked on a validation part of train, scored once on test."""

from __future__ import annotations

import random
from pathlib import Path

import webdataset as wds
from PIL import Image

import training.model as M
from training.probe import fit_probe, linear_probe
from training.toydata import COLOURS, jpeg

CLASSES = ["red", "green", "blue", "yellow"]


def _split(root: Path, split: str, per_class: int, seed: int, shuffle_labels=False) -> None:
    rng = random.Random(seed)
    (root / split).mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(root / split / "0.tar")) as tw:
        for c, name in enumerate(CLASSES):
            for i in range(per_class):
                base = COLOURS[name]
                px = tuple(min(255, max(0, v + rng.randint(-40, 40))) for v in base)
                img = Image.new("RGB", (40, 40), px)
                label = rng.randrange(len(CLASSES)) if shuffle_labels else c
                tw.write({"__key__": f"{split}_{name}{i}", "jpg": jpeg(img), "cls": str(label)})
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")


def test_probe_separates_colours_with_frozen_random_features(tmp_path):
    # an untrained tower still maps colours to separable features: the probe finds them,
    # which zero-shot (needing the text tower to agree) cannot
    d = tmp_path / "colours"
    _split(d, "train", 15, seed=1)
    _split(d, "test", 10, seed=2)
    model, _, preprocess, _ = M.create("witforge-micro")
    model.eval()
    r = linear_probe(model, preprocess, d)
    assert r["task"] == "linear_probe" and r["train"] == 60 and r["n"] == 40
    assert r["top1"] >= 0.9, r
    assert r["C"] in (0.01, 0.1, 1.0, 10.0, 100.0) and r["validation_accuracy"]


def test_probe_is_at_chance_when_train_labels_are_noise(tmp_path):
    d = tmp_path / "noise"
    _split(d, "train", 15, seed=1, shuffle_labels=True)
    _split(d, "test", 25, seed=2)
    model, _, preprocess, _ = M.create("witforge-micro")
    model.eval()
    assert linear_probe(model, preprocess, d)["top1"] < 0.5


def test_c_is_chosen_on_the_validation_part_only():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8))
    y = (x[:, 0] > 0).astype(int)
    keys = [f"k{i}" for i in range(200)]
    clf, c, scores = fit_probe(x, y, keys)
    assert set(scores) == {0.01, 0.1, 1.0, 10.0, 100.0} and scores[c] == max(scores.values())
    assert (clf.predict(x) == y).mean() > 0.95
