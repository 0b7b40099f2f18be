"""The loader's fast paths give what open_clip's transform and webdataset's tar reader give."""

from __future__ import annotations

import glob
import io
import tarfile
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image
from webdataset.tariterators import tar_file_expander, url_opener

import training.model as M
from training.fastpre import FastBatch, PerImage, batch_preprocess
from training.tarstream import is_local_tar, tar_expander
from training.toydata import write_toy_shards

# Real images committed with the tests (openclipart as Debian ships it, public domain; see
# tests/data/real_images/README.md): clip art with alpha (RGBA, LA), palette images with
# transparency (P), portrait, landscape and a thin strip, larger and smaller than the input.
REAL = sorted(glob.glob(str(Path(__file__).parent / "data" / "real_images" / "*.png")))


@pytest.fixture(scope="module")
def images():
    assert len(REAL) == 7, "tests/data/real_images/ should hold 7 PNGs"
    out = []
    for path in REAL:
        im = Image.open(path)
        im.load()
        out.append(im)
    # also what the loader hands over: JPEG bytes as crawled, decoded and converted to RGB
    buf = io.BytesIO()
    out[0].convert("RGB").save(buf, format="JPEG", quality=90)
    out.append(Image.open(buf).convert("RGB"))
    assert {im.mode for im in out} >= {"RGBA", "P", "LA", "RGB"}
    return out


@pytest.fixture(scope="module", params=["witforge-tiny", "witforge-micro"])
def transforms(request):
    _, train_pre, eval_pre, _ = M.create(request.param)
    return train_pre, eval_pre


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
def test_fast_batch_equals_open_clip_transform_on_real_images(images, transforms):
    # The fast path runs the same PIL crop/resize calls and only fuses ToTensor + Normalize
    # into one op per batch: (x - 255 mean) / (255 std) instead of (x / 255 - mean) / std.
    # In float32 the two differ by rounding only (~1e-6 after normalization; a pixel step is
    # 1 / (255 * std) ~ 0.015), so the bound is 1e-4, far below one grey level.
    train_pre, eval_pre = transforms
    fast = batch_preprocess(eval_pre)
    assert isinstance(fast, FastBatch)
    want = torch.stack([eval_pre(im) for im in images])
    got = fast(images)
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
    assert (got - want).abs().max().item() < 1e-4

    # Train: for the crop boxes the fast path drew, open_clip's own RandomResizedCrop step
    # (F.resized_crop with its size/interpolation) and the rest of its Compose.
    fast = batch_preprocess(train_pre)
    rrc, rest = train_pre.transforms[0], T.Compose(train_pre.transforms[1:])
    torch.manual_seed(7)
    boxes = fast.crop_boxes(images)
    want = torch.stack([rest(F.resized_crop(im, *box, rrc.size, rrc.interpolation,
                                            antialias=rrc.antialias))
                        for im, box in zip(images, boxes, strict=True)])
    torch.manual_seed(7)
    got = fast(images)
    assert got.shape == want.shape == (len(images), 3, *rrc.size)
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("size", [(120, 90), (64, 64), (300, 40)])
def test_crop_boxes_follow_torchvision_distribution(size):
    # Boxes come from torchvision's get_params algorithm on a Python RNG: the same
    # distribution (means of height/width/top/left, spread, and the centre-crop fallback for
    # extreme aspect ratios) as torchvision's own draws.
    rrc = T.RandomResizedCrop(64, scale=(0.08, 1.0))
    fast = FastBatch([rrc], "RGB", (0.5,) * 3, (0.5,) * 3)
    im = Image.new("RGB", size)
    torch.manual_seed(0)
    ours = torch.tensor([b for _ in range(30) for b in fast.crop_boxes([im] * 100)], dtype=float)
    theirs = torch.tensor([rrc.get_params(im, rrc.scale, rrc.ratio) for _ in range(3000)],
                          dtype=float)
    w, h = size
    for col, extent in zip(range(4), (h, w, h, w), strict=True):
        assert abs(ours[:, col].mean() - theirs[:, col].mean()) < 0.03 * extent
        assert abs(ours[:, col].std() - theirs[:, col].std()) < 0.03 * extent
    assert ((ours[:, 2] <= h) & (ours[:, 3] <= w) & (ours[:, 2:] > 0).all(1)).all()


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
def test_train_crops_follow_the_seed(images, transforms):
    fast = batch_preprocess(transforms[0])
    torch.manual_seed(1)
    a = fast(images)
    torch.manual_seed(1)
    b = fast(images)
    torch.manual_seed(2)
    c = fast(images)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # random crops, not a fixed centre crop


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
def test_other_transforms_fall_back_to_per_image(images, transforms):
    train_pre = transforms[0]
    flip = T.Compose([T.RandomHorizontalFlip(1.0), *train_pre.transforms])
    fallback = batch_preprocess(flip)
    assert isinstance(fallback, PerImage)
    torch.manual_seed(3)
    want = torch.stack([flip(im) for im in images])
    torch.manual_seed(3)
    assert torch.equal(fallback(images), want)
    assert isinstance(batch_preprocess(lambda im: im), PerImage)


# -- tar reader ----------------------------------------------------------------------------
def _webdataset_files(urls):
    errors = []

    def handler(exn):
        errors.append(exn)
        return True

    out = list(tar_file_expander(url_opener([{"url": u} for u in urls], handler=handler),
                                 handler=handler))
    return out, errors


def _ours(urls):
    errors = []

    def handler(exn):
        errors.append(exn)
        return True

    return list(tar_expander(urls, handler)), errors


def _tar(path, members, fmt):
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            if data is None:
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
                continue
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return str(path)


def test_tar_reader_matches_webdataset(tmp_path):
    toy = write_toy_shards(tmp_path / "toy", 12, per_shard=5)  # webdataset TarWriter: PAX
    long_dir = "d" * 120
    members = [("dir", None), ("a.jpg", b"\xff\xd8 image"), ("a.txt", "caption é".encode()),
               ("__meta__", b"skip"), (f"{long_dir}/b.jpg", bytes(range(256)) * 3),
               (f"{long_dir}/b.txt", b"x" * 512), ("c" * 150 + ".txt", b"")]
    ustar = _tar(tmp_path / "ustar.tar", members[:-1], tarfile.USTAR_FORMAT)  # name prefix
    gnu = _tar(tmp_path / "gnu.tar", members, tarfile.GNU_FORMAT)  # ././@LongLink
    pax = _tar(tmp_path / "pax.tar", members, tarfile.PAX_FORMAT)
    urls = [*toy, ustar, gnu, pax]
    assert all(is_local_tar(u) for u in urls)
    want, want_err = _webdataset_files(urls)
    got, got_err = _ours(urls)
    assert not want_err and not got_err
    assert got == want
    names = {f["fname"] for f in got if f}
    assert f"{long_dir}/b.jpg" in names and "c" * 150 + ".txt" in names
    assert "__meta__" not in names and "dir" not in names


def test_tar_reader_reports_damage_and_goes_on(tmp_path):
    good = write_toy_shards(tmp_path / "good", 4, per_shard=4)[0]
    raw = open(good, "rb").read()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(raw[:1500])  # inside the second member
    bad_sum = tmp_path / "bad_sum.tar"
    with tarfile.open(good) as tf:
        at = tf.getmembers()[1].offset + 5  # in the name field of the 2nd member's header
    bad_sum.write_bytes(raw[:at] + b"X" + raw[at + 1:])
    got, errors = _ours([str(truncated), str(bad_sum), good])
    assert len(errors) == 2
    assert all(isinstance(e, tarfile.ReadError) for e in errors)
    assert "truncated.tar" in str(errors[0]) and "bad_sum.tar" in str(errors[1])
    # what was read before the damage is kept, then the good shard in full
    want_good, _ = _webdataset_files([good])
    assert got[-len(want_good):] == want_good
    assert len(got) > len(want_good)
    assert not is_local_tar("pipe:cat x.tar") and not is_local_tar("x.tar.gz")
