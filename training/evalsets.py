"""Demo evaluation sets, held out from training, in CLIP_benchmark's webdataset layout.

* ``fashion_mnist``: the test split of Fashion-MNIST (Debian ``dataset-fashion-mnist``): real
  28x28 product photos in 10 classes, nothing like them in the demo pool — a true zero-shot
  test. A class-balanced subset (default 1,000 images) keeps evaluation fast.
* ``demo_heldout_categories``: the demo pool's held-out images (split='heldout', never served
  by the demo web) classified by their category (emoji subgroup, Tux Paint / OpenClipart
  folder), for categories with enough held-out images.
* ``demo_heldout_retrieval``: the same held-out images with their captions.

``python -m training.evalsets --pool demo_data/pool --out runs/evalsets``
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import struct
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import webdataset as wds
from open_clip import OPENAI_IMAGENET_TEMPLATES
from PIL import Image

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
# Every classification set carries OpenAI's 80 ImageNet prompts in its own
# zeroshot_classification_templates.txt: CLIP_benchmark reads that file for a webdataset set, and
# `witforge evaluate` (eval.templates: dataset) reads the same file, so both ensemble the same
# prompts.
OPENAI_TEMPLATES = [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]


class EvalSetUnavailable(RuntimeError):
    """The source data of an eval set is not on this machine (e.g. a Debian package)."""


def _read_idx(path: Path) -> tuple[tuple[int, ...], bytes]:
    with gzip.open(path, "rb") as f:
        data = f.read()
    _, _, dtype, ndim = struct.unpack(">BBBB", data[:4])
    if dtype != 0x08:
        raise ValueError(f"{path}: expected unsigned-byte IDX data, got type {dtype:#x}")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return dims, data[4 + 4 * ndim:]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write_set(out: Path, samples: list[dict], classnames: list[str] | None = None,
               templates: list[str] | None = None, per_shard: int = 1000,
               dataset_type: str | None = None, split: str = "test") -> Path:
    """CLIP_benchmark's webdataset layout: test/{0..n-1}.tar + nshards.txt, classnames.txt and
    zeroshot_classification_templates.txt for classification, dataset_type.txt = retrieval for
    retrieval sets (without it CLIP_benchmark reads a set as classification and looks for .cls)."""
    (out / split).mkdir(parents=True, exist_ok=True)
    for old in (out / split).glob("*.tar"):
        old.unlink()
    for i in range(0, len(samples), per_shard):
        with wds.TarWriter(str(out / split / f"{i // per_shard}.tar")) as tw:
            for s in samples[i:i + per_shard]:
                tw.write(s)
    (out / split / "nshards.txt").write_text(f"{(len(samples) - 1) // per_shard + 1}\n")
    if classnames is not None:
        (out / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates is not None:
        (out / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    if dataset_type is not None:
        (out / "dataset_type.txt").write_text(dataset_type + "\n")
    return out


def _fashion_split(root: Path, prefix: str, n: int) -> list[dict]:
    """Class-balanced first ``n`` images of a Fashion-MNIST file pair (t10k or train)."""
    images_gz, labels_gz = root / f"{prefix}-images-idx3-ubyte.gz", \
        root / f"{prefix}-labels-idx1-ubyte.gz"
    if not (images_gz.is_file() and labels_gz.is_file()):
        raise EvalSetUnavailable(f"Fashion-MNIST not found in {root}: install the Debian "
                                 "package dataset-fashion-mnist (apt-get install "
                                 "dataset-fashion-mnist) to get this eval set")
    (count, h, w), pixels = _read_idx(images_gz)
    _, labels = _read_idx(labels_gz)
    per_class, taken, samples = n // 10, defaultdict(int), []
    for i in range(count):
        c = labels[i]
        if taken[c] >= per_class:
            continue
        taken[c] += 1
        img = Image.frombytes("L", (w, h), pixels[i * h * w:(i + 1) * h * w])
        samples.append({"__key__": f"{prefix}_{i:05d}", "png": _png(img), "cls": str(c)})
        if len(samples) >= per_class * 10:
            break
    return samples


def write_fashion_mnist(out: Path, n: int = 1000, root: Path = FASHION_ROOT,
                        n_train: int = 2000) -> Path:
    """test/: class-balanced first ``n`` images of the test split (t10k), for zero-shot and as
    the linear probe's test set; train/: ``n_train`` of the train split, the probe's training
    images (CLIP_benchmark's linear_probe reads the same two splits)."""
    out = _write_set(out, _fashion_split(root, "t10k", n), FASHION_CLASSES, OPENAI_TEMPLATES)
    if n_train:
        _write_set(out, _fashion_split(root, "train", n_train), split="train")
    return out


def _classname(category: str) -> str:
    leaf = category.split("/", 1)[-1]
    return re.sub(r"[-_]+", " ", leaf).strip().lower()


def write_pool_sets(pool_dir: Path, out_dir: Path, min_per_class: int = 5,
                    max_per_class: int = 50, max_pairs: int = 500) -> dict[str, Path]:
    """Classification-by-category and retrieval sets from the pool's held-out split (test/);
    when the pool also has a 'val' split (never served either), its images of the same
    categories are the category set's train/ split, for the linear probe."""
    table = pq.read_table(pool_dir / "pool.parquet",
                          columns=["image_id", "file", "caption", "category", "split"])
    every = sorted(table.to_pylist(), key=lambda r: r["image_id"])
    rows = [r for r in every if r["split"] == "heldout"]
    if not rows:
        raise EvalSetUnavailable(f"{pool_dir}/pool.parquet has no held-out images")

    def image_bytes(r: dict) -> tuple[str, bytes]:
        p = Path(r["file"])
        p = p if p.is_absolute() else pool_dir / p
        ext = p.suffix.lstrip(".").lower().replace("jpeg", "jpg")
        return ext, p.read_bytes()

    by_class: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_class[_classname(r["category"])].append(r)
    classnames = sorted(c for c, rs in by_class.items() if len(rs) >= min_per_class)
    cls_samples = []
    for idx, c in enumerate(classnames):
        for r in by_class[c][:max_per_class]:
            ext, data = image_bytes(r)
            cls_samples.append({"__key__": r["image_id"], ext: data, "cls": str(idx)})
    out: dict[str, Path] = {}
    if len(classnames) >= 2:
        out["demo_heldout_categories"] = _write_set(
            out_dir / "demo_heldout_categories", cls_samples, classnames, OPENAI_TEMPLATES)
        index = {c: i for i, c in enumerate(classnames)}
        train, per = [], defaultdict(int)
        for r in every:
            c = _classname(r["category"])
            if r["split"] == "val" and c in index and per[c] < max_per_class:
                per[c] += 1
                ext, data = image_bytes(r)
                train.append({"__key__": r["image_id"], ext: data, "cls": str(index[c])})
        if train:
            _write_set(out["demo_heldout_categories"], train, split="train")
    pairs = []
    for r in rows[:max_pairs]:
        ext, data = image_bytes(r)
        pairs.append({"__key__": r["image_id"], ext: data, "txt": r["caption"].strip()})
    out["demo_heldout_retrieval"] = _write_set(out_dir / "demo_heldout_retrieval", pairs,
                                               dataset_type="retrieval")
    return out


def write_demo_eval_sets(pool_dir: Path | None, out_dir: Path,
                         fashion_n: int = 1000) -> dict[str, Path]:
    """Every demo eval set that can be made here: {name: folder}. A set whose source data is
    missing is left out, with the reason in ``<out_dir>/missing.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    missing: dict[str, str] = {}
    try:
        made["fashion_mnist"] = write_fashion_mnist(out_dir / "fashion_mnist", fashion_n)
    except EvalSetUnavailable as e:
        missing["fashion_mnist"] = str(e)
    if pool_dir is not None and (pool_dir / "pool.parquet").is_file():
        try:
            made.update(write_pool_sets(pool_dir, out_dir))
        except EvalSetUnavailable as e:
            missing["demo_heldout"] = str(e)
    else:
        missing["demo_heldout"] = f"no pool.parquet in {pool_dir} (run `witforge demo-data`)"
    (out_dir / "missing.json").write_text(json.dumps(missing, indent=1))
    return made


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evalsets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", type=Path, default=Path("demo_data/pool"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--fashion-n", type=int, default=1000)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    made = write_demo_eval_sets(a.pool, a.out, a.fashion_n)
    for name, path in made.items():
        print(f"{name}: {path}")
    for name, why in json.loads((a.out / "missing.json").read_text()).items():
        print(f"{name}: skipped — {why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
