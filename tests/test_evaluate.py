"""Zero-shot classification, retrieval metrics, demo eval sets and `witforge classify`."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

import training.model as M
from training import evalsets
from training.classify import main as classify_main
from training.evaluate import (
    classification_metrics,
    retrieval,
    retrieval_metrics,
    templates_for,
    zero_shot,
)
from training.toydata import COLOURS, jpeg

CLASSES = ["red", "green", "blue", "yellow"]


def _colour_set(root: Path, per_class: int = 3) -> Path:
    (root / "test").mkdir(parents=True)
    with wds.TarWriter(str(root / "test" / "0.tar")) as tw:
        for c, name in enumerate(CLASSES):
            for i in range(per_class):
                img = Image.new("RGB", (40, 40), COLOURS[name])
                tw.write({"__key__": f"{name}{i}", "jpg": jpeg(img), "cls": str(c),
                          "txt": f"a {name} square\nthe colour {name}"})
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    return root


class AgreeingCLIP(torch.nn.Module):
    """A real open_clip text tower; an image tower that returns the zero-shot classifier's
    embedding of the image's colour, i.e. the two towers agree by construction."""

    def __init__(self, model, class_embeddings: torch.Tensor):
        super().__init__()
        self.model, self.class_embeddings = model, class_embeddings  # [classes, dim]
        mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(
            open_clip.OPENAI_DATASET_STD)
        rgb = torch.tensor([COLOURS[c] for c in CLASSES], dtype=torch.float32) / 255
        self.class_pixels = (rgb - mean) / std

    def encode_text(self, tokens, normalize=False):
        return self.model.encode_text(tokens, normalize=normalize)

    def encode_image(self, images, normalize=False):
        pixel = images.mean(dim=(2, 3))  # [B, 3], normalised colour of a uniform image
        nearest = torch.cdist(pixel, self.class_pixels).argmin(dim=1)
        return self.class_embeddings[nearest]


def test_zero_shot_is_100_percent_when_the_towers_agree(tmp_path):
    model, _, preprocess, tok = M.create("witforge-micro")
    model.eval()
    templates = templates_for(tmp_path, "simple")
    classifier = open_clip.build_zero_shot_classifier(model, tok, CLASSES, templates)
    agreeing = AgreeingCLIP(model, classifier.T)
    d = _colour_set(tmp_path / "colours")
    r = zero_shot(agreeing, preprocess, tok, d, templates="simple")
    assert r["top1"] == 1.0 and r["top5"] == 1.0 and r["mean_per_class_recall"] == 1.0
    assert r["n"] == 12 and r["classes"] == 4 and r["templates"] == len(templates) == 7
    # The untrained model itself is nowhere near: the 100 % comes from the agreement.
    assert zero_shot(model, preprocess, tok, d, templates="simple")["top1"] < 1.0


def test_classification_metrics_by_hand():
    logits = torch.tensor([[9, 1, 0], [0, 9, 1], [9, 0, 1], [1, 0, 9.0]])
    labels = torch.tensor([0, 1, 1, 2])
    r = classification_metrics(logits, labels)
    assert r["top1"] == 0.75 and r["top5"] == 1.0
    assert r["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_retrieval_metrics_on_hand_made_similarities():
    # 3 images; texts 0,1 belong to image 0, text 2 to image 1, text 3 to image 2.
    owner = torch.tensor([0, 0, 1, 2])
    sim = torch.tensor([[0.1, 0.9, 0.5, 0.0],   # image 0: best text 1 (its own) -> hit
                        [0.8, 0.0, 0.7, 0.2],   # image 1: best text 0 (wrong), own text 2nd
                        [0.0, 0.3, 0.2, 0.1]])  # image 2: own text ranked 3rd
    r = retrieval_metrics(sim, owner, ks=(1, 2, 5))
    assert r["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert r["image_to_text_R@2"] == pytest.approx(2 / 3)
    assert r["image_to_text_R@5"] == 1.0
    # text->image: t0 best image 1 (wrong, own 2nd), t1 best image 0 (right), t2 best image 1
    # (right), t3 best image 1 (wrong, own 2nd).
    assert r["text_to_image_R@1"] == pytest.approx(2 / 4)
    assert r["text_to_image_R@2"] == pytest.approx(1.0)


def test_retrieval_task_reads_captions_per_image(tmp_path):
    model, _, preprocess, tok = M.create("witforge-micro")
    model.eval()
    r = retrieval(model, preprocess, tok, _colour_set(tmp_path / "colours", per_class=1))
    assert r["images"] == 4 and r["texts"] == 8
    assert r["image_to_text_R@10"] == 1.0 and 0 <= r["image_to_text_R@1"] <= 1


def _idx(path: Path, dims: tuple[int, ...], data: bytes) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
    path.write_bytes(gzip.compress(header + data))


def test_fashion_mnist_set_is_class_balanced_in_clip_benchmark_layout(tmp_path):
    root = tmp_path / "fm"
    root.mkdir()
    n = 50
    labels = bytes(i % 10 for i in range(n))
    _idx(root / "t10k-images-idx3-ubyte.gz", (n, 28, 28), bytes(range(256)) * (n * 784 // 256)
         + bytes(n * 784 % 256))
    _idx(root / "t10k-labels-idx1-ubyte.gz", (n,), labels)
    for part in ("images-idx3", "labels-idx1"):  # the train split: the same bytes here
        (root / f"train-{part}-ubyte.gz").write_bytes((root / f"t10k-{part}-ubyte.gz")
                                                      .read_bytes())
    out = evalsets.write_fashion_mnist(tmp_path / "set", n=20, root=root, n_train=30)
    assert (out / "classnames.txt").read_text().splitlines()[0] == "T-shirt/top"
    samples = list(wds.WebDataset(str(out / "test" / "0.tar"), shardshuffle=False))
    assert len(samples) == 20
    assert sorted(int(s["cls"]) for s in samples) == sorted(list(range(10)) * 2)
    assert Image.open(__import__("io").BytesIO(samples[0]["png"])).size == (28, 28)
    # the linear probe's train split, class-balanced too, from the train files
    train = list(wds.WebDataset(str(out / "train" / "0.tar"), shardshuffle=False))
    assert sorted(int(s["cls"]) for s in train) == sorted(list(range(10)) * 3)
    assert all(s["__key__"].startswith("train_") for s in train)
    with pytest.raises(evalsets.EvalSetUnavailable, match="dataset-fashion-mnist"):
        evalsets.write_fashion_mnist(tmp_path / "x", root=tmp_path / "absent")


def test_pool_heldout_sets_only_use_heldout_images(tmp_path):
    pool = tmp_path / "pool"
    (pool / "images").mkdir(parents=True)
    rows = []
    for i in range(30):
        cat = ["emoji/animal-mammal", "tuxpaint/food", "openclipart/animals"][i % 3]
        f = f"images/im{i}.jpg"
        (pool / f).write_bytes(jpeg(Image.new("RGB", (16, 16), (i * 8, 0, 0))))
        rows.append({"image_id": f"im{i}", "file": f, "caption": f"caption {i}",
                     "category": cat, "origin": cat.split("/")[0],
                     "split": "heldout" if i < 24 else "val" if i < 27 else "web"})
    pq.write_table(pa.Table.from_pylist(rows), pool / "pool.parquet")
    made = evalsets.write_demo_eval_sets(pool, tmp_path / "sets", fashion_n=10)
    cls_dir, ret_dir = made["demo_heldout_categories"], made["demo_heldout_retrieval"]
    assert (cls_dir / "classnames.txt").read_text().split("\n")[:3] == [
        "animal mammal", "animals", "food"]
    keys = {s["__key__"] for s in wds.WebDataset(str(ret_dir / "test" / "0.tar"),
                                                 shardshuffle=False)}
    assert keys == {f"im{i}" for i in range(24)}  # held-out only
    # the probe's train split: the pool's 'val' images (never served), same class ids
    train = list(wds.WebDataset(str(cls_dir / "train" / "0.tar"), shardshuffle=False))
    assert {s["__key__"] for s in train} == {"im24", "im25", "im26"}
    names = (cls_dir / "classnames.txt").read_text().split("\n")
    assert {names[int(s["cls"])] for s in train} == {"animal mammal", "food", "animals"}
    missing = json.loads((tmp_path / "sets" / "missing.json").read_text())
    assert ("fashion_mnist" in made) != ("fashion_mnist" in missing)
    # CLIP_benchmark's webdataset layout: a retrieval set says so (else it looks for .cls),
    # classification sets carry the prompts both tools ensemble (OpenAI's 80)
    assert (ret_dir / "dataset_type.txt").read_text().strip() == "retrieval"
    assert not (cls_dir / "dataset_type.txt").exists()
    assert (ret_dir / "test" / "nshards.txt").read_text().strip() == "1"
    own = (cls_dir / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert len(own) == 80 and own[0] == "a bad photo of a {c}."


def test_dataset_templates_are_the_sets_own_file_formatted_as_clip_benchmark_does(tmp_path):
    # CLIP_benchmark formats file templates with t.format(c=name); open_clip's classifier
    # builder formats strings positionally, which would fail on "{c}".
    d = _colour_set(tmp_path / "colours")
    (d / "zeroshot_classification_templates.txt").write_text(
        "a photo of {c}.\n\nthe colour {c}\n")
    got = templates_for(d, "dataset")
    assert [t("red") for t in got] == ["a photo of red.", "the colour red"]
    model, _, preprocess, tok = M.create("witforge-micro")
    model.eval()
    r = zero_shot(model, preprocess, tok, d, templates="dataset")
    assert r["templates"] == 2 and r["n"] == 12
    # without a file of its own a set gets OpenAI's 80
    assert len(templates_for(tmp_path / "colours_no_file", "dataset")) == 80


def test_classify_prints_label_probabilities(tmp_path, capsys):
    model, _, _, _ = M.create("witforge-micro")
    ckpt = tmp_path / "m.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    img = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (220, 30, 30)).save(img)
    assert classify_main(["--checkpoint", str(ckpt), "--model", "witforge-micro",
                          "--labels", "a red square,a blue circle,a dog", str(img)]) == 0
    out = capsys.readouterr().out
    assert "Label probs: [[" in out
    probs = [float(x) for x in out.split("[[")[1].split("]]")[0].split()]
    assert len(probs) == 3 and sum(probs) == pytest.approx(1.0, abs=1e-4)
    assert classify_main(["--checkpoint", str(tmp_path / "none.pt"), "--model",
                          "witforge-micro", "--labels", "a,b", str(img)]) == 2
