"""The embed stage on real images (the committed demo fixture) in crawl-style tars, with real
open_clip models: the clip-retrieval layout keyed by uid, clip_score, unreadable images, the
release formats of real checkpoints (ViT-B-32 with random weights, saved as OpenAI and
open_clip save theirs) checked against open_clip's own encode_image/encode_text, the errors of
a checkpoint that does not fit, and resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import training.model  # noqa: F401  (registers the witforge-* configs with open_clip)
from pipeline import embeddings
from pipeline.config import load_build
from pipeline.stage import StageError, run_stage
from tests.curation_fixtures import crawl_run, make_build, read_parquet
from training.embed import load_embedder
from training.options import TrainOptions
from training.train import train

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "pipeline" / "demoweb" / "fixture"
QUIET = {"log": lambda s: None}


def fixture_pairs(n: int, start: int = 0) -> list[tuple[str, str, bytes]]:
    """(uid, caption, JPEG bytes) of real fixture images (clip art and emoji)."""
    rows = pq.read_table(FIXTURE / "pool.parquet").to_pylist()[start:start + n]
    return [(r["image_id"], r["caption"], (FIXTURE / r["file"]).read_bytes()) for r in rows]


def embed_build(tmp: Path, checkpoint: str, model: str = "witforge-micro",
                extra: str = "", batch_size: int = 8) -> object:
    return make_build(tmp, f"embed:\n  model: {model}\n  checkpoint: {checkpoint}\n"
                           f"  batch_size: {batch_size}\n{extra}")


def random_checkpoint(path: Path, arch: str = "witforge-micro", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    m = open_clip.create_model(arch)
    torch.save({"state_dict": m.state_dict(), "arch": arch, "loss": "clip", "step": 1}, path)
    return path


def reference(model: torch.nn.Module, preprocess, tokenizer, pairs) -> tuple[np.ndarray, ...]:
    """open_clip's own embeddings of the pairs, image by image as a user would compute them."""
    model.eval()
    imgs, txts = [], []
    with torch.no_grad():
        for _, caption, data in pairs:
            import io

            im = preprocess(Image.open(io.BytesIO(data))).unsqueeze(0)
            imgs.append(model.encode_image(im, normalize=True)[0].numpy())
            txts.append(model.encode_text(tokenizer([caption]), normalize=True)[0].numpy())
    return np.stack(imgs), np.stack(txts)


def test_embed_writes_clip_retrieval_layout_scores_and_drops_unreadable(tmp_path):
    ckpt = random_checkpoint(tmp_path / "model.pt")
    cfg = embed_build(tmp_path, str(ckpt))
    pairs = fixture_pairs(20)
    pairs[3] = (pairs[3][0], pairs[3][1], b"<html>not an image</html>")
    pairs[7] = (pairs[7][0], pairs[7][1], None)  # listed by the crawl, no member in the tar
    crawl_run(cfg, pairs, upstream="image_dedup", per_tar=6)
    report = run_stage(cfg, "embed", **QUIET)

    folder = cfg.run_dir / "10_embed"
    assert report["rows_in"] == 20 and report["kept"] == 18 and report["parts"] == 4
    dropped = {r["uid"]: r for r in read_parquet(folder / "dropped.parquet")}
    assert set(dropped) == {pairs[3][0], pairs[7][0]}
    assert {r["reason"] for r in dropped.values()} == {"unreadable_image"}
    assert "cannot identify image file" in dropped[pairs[3][0]]["detail"]
    assert "0x" not in dropped[pairs[3][0]]["detail"]  # no per-run object address
    assert "no image member" in dropped[pairs[7][0]]["detail"]

    # clip-retrieval's files, float16, L2-normalised, keyed by uid (in metadata)
    for sub, ext in (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet")):
        assert sorted(p.name for p in (folder / sub).iterdir()) == [
            f"{sub}_{i:04d}.{ext}" for i in range(4)]
    arr = np.load(folder / "img_emb" / "img_emb_0000.npy")
    assert arr.dtype == np.float16 and arr.shape == (5, 64)  # part 0 lost pairs[3]
    assert np.allclose(np.linalg.norm(arr.astype(np.float32), axis=1), 1, atol=2e-3)
    meta = pq.read_table(folder / "metadata" / "metadata_0000.parquet").to_pylist()
    assert [m["row"] for m in meta] == list(range(5))
    assert meta[0]["uid"] == pairs[0][0] and meta[0]["caption"] == pairs[0][1]
    assert meta[0]["url"] == f"http://127.0.0.1/{pairs[0][0]}.jpg"

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["architecture"] == "witforge-micro" and manifest["dim"] == 64
    assert manifest["checkpoint"] == str(ckpt)
    assert manifest["checkpoint_format"] == "witforge train/model.pt"
    import hashlib
    assert manifest["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert manifest["preprocess"]["size"] == [32, 32]

    # clip_score = the cosine of each row's own image and text embedding, every input column kept
    kept = read_parquet(folder / "kept.parquet")
    inputs = read_parquet(cfg.run_dir / "08_image_dedup" / "kept.parquet")
    assert set(kept[0]) == set(inputs[0]) | {"clip_score", "clip_score_raw"}
    e = embeddings.load(folder, [r["uid"] for r in kept])
    cos = (e.img * e.txt).sum(axis=1)
    got = np.array([r["clip_score"] for r in kept])
    assert np.allclose(got, cos, atol=3e-3) and got.std() > 0
    assert all(r["clip_score"] == r["clip_score_raw"] for r in kept)

    # the same numbers as open_clip's own encode on the same images
    model, _, pre = open_clip.create_model_and_transforms("witforge-micro", pretrained=str(ckpt))
    by_uid = {u: p for u, *p in pairs}
    want_img, want_txt = reference(model, pre, open_clip.get_tokenizer("witforge-micro"),
                                   [(u, *by_uid[u]) for u in e.uids])
    assert np.abs(e.img - want_img).max() < 2e-3 and np.abs(e.txt - want_txt).max() < 2e-3
    assert np.allclose(got, (want_img * want_txt).sum(axis=1), atol=1e-4)


class _OpenAIRelease(torch.nn.Module):
    """An open_clip CLIP laid out as OpenAI's released TorchScript files are: the same
    parameter names at the top level plus input_resolution, context_length and vocab_size."""

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        for name, child in clip.named_children():
            setattr(self, name, child)
        for name, p in clip.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, v in (("input_resolution", 224), ("context_length", 77),
                        ("vocab_size", 49408)):
            self.register_buffer(name, torch.tensor(v))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


def test_vit_b32_release_formats_load_through_embed_checkpoint(tmp_path):
    """ViT-B-32 with random weights saved as OpenAI (TorchScript; plain fp16 state dict) and
    open_clip (open_clip_pytorch_model.bin; a training checkpoint with DDP's module. prefix)
    save theirs, and as a model config JSON: each loaded through embed.checkpoint gives open_clip's
    own embeddings of the same images."""
    torch.manual_seed(1)
    model, _, pre = open_clip.create_model_and_transforms("ViT-B-32-quickgelu")
    model.half().float()  # OpenAI's files hold fp16 weights: compare with exactly those
    model.eval()
    pairs = fixture_pairs(6, start=100)
    want_img, want_txt = reference(model, pre, open_clip.get_tokenizer("ViT-B-32"), pairs)
    sd = model.state_dict()

    files = {}
    release = _OpenAIRelease(model).half()
    files["openai_jit"] = tmp_path / "ViT-B-32.pt"
    torch.jit.trace(release, (torch.zeros(1, 3, 224, 224, dtype=torch.half),),
                    check_trace=False).save(files["openai_jit"])
    model.float()
    files["openai_state_dict"] = tmp_path / "openai-state-dict.pt"
    torch.save({k: v.half() for k, v in release.state_dict().items()},
               files["openai_state_dict"])
    files["open_clip_bin"] = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(sd, files["open_clip_bin"])
    files["training_checkpoint"] = tmp_path / "epoch_32.pt"
    torch.save({"epoch": 32, "name": "run",
                "state_dict": {f"module.{k}": v for k, v in sd.items()}},
               files["training_checkpoint"])
    cfg_json = tmp_path / "my-vit.json"
    cfg_json.write_text(json.dumps(open_clip.get_model_config("ViT-B-32-quickgelu")))
    del release

    cfg = embed_build(tmp_path, "x", "ViT-B-32")
    crawl_run(cfg, pairs, upstream="image_dedup", per_tar=4)
    uids = [u for u, _, _ in pairs]
    cases = [("openai_jit", "ViT-B-32", True), ("openai_state_dict", "ViT-B-32", True),
             ("open_clip_bin", "ViT-B-32-quickgelu", False),
             ("training_checkpoint", str(cfg_json), False)]
    for name, arch, forced in cases:
        text = (tmp_path / "b.yaml").read_text().split("embed:")[0]
        (tmp_path / "b.yaml").write_text(
            text + f"embed:\n  model: {arch}\n  checkpoint: {files[name]}\n  batch_size: 4\n")
        report = run_stage(load_build(tmp_path / "b.yaml"), "embed", **QUIET)
        folder = cfg.run_dir / "10_embed"
        assert report["parts_reused"] == 0, name  # a new checkpoint never reuses old parts
        e = embeddings.load(folder, uids)
        assert np.abs(e.img - want_img).max() < 3e-3, name
        assert np.abs(e.txt - want_txt).max() < 3e-3, name
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["quick_gelu_forced"] is forced, name
        assert manifest["dim"] == 512 and manifest["checkpoint"] == str(files[name])
    assert json.loads((folder / "manifest.json").read_text())["architecture"] == str(cfg_json)


def test_checkpoint_errors_name_the_key_the_file_and_what_was_expected(tmp_path):
    micro = random_checkpoint(tmp_path / "micro.pt")
    with pytest.raises(ValueError, match=r"embed.checkpoint: .*nope.pt not found"):
        load_embedder("witforge-micro", tmp_path / "nope.pt")
    (tmp_path / "notes.txt").write_text("these are not weights\n")
    with pytest.raises(ValueError, match=r"embed.checkpoint: .*notes.txt is not a checkpoint"):
        load_embedder("witforge-micro", tmp_path / "notes.txt")
    torch.save({"state_dict": {"visual.conv1.weight": "a string"}}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"odd.pt: entry 'visual.conv1.weight' is a str"):
        load_embedder("witforge-micro", tmp_path / "odd.pt")
    # witforge-micro's weights where witforge-tiny is configured: same names, other shapes
    # and two transformer blocks fewer
    with pytest.raises(ValueError) as err:
        load_embedder("witforge-tiny", micro)
    msg = str(err.value)
    assert msg.startswith(f"embed.checkpoint: the state dict in {micro} does not fit "
                          "witforge-tiny (the file says it was trained as witforge-micro)")
    assert ": 48 missing keys such as visual.transformer.resblocks.2.ln_1.weight, " in msg
    assert "; 61 with another shape, e.g. positional_embedding is [16, 64] in the file but " \
           "[32, 128] in witforge-tiny" in msg
    # keys that are not CLIP's at all
    sd = torch.load(micro, weights_only=True)["state_dict"]
    sd = {("backbone." + k if k.startswith("visual.") else k): v for k, v in sd.items()}
    torch.save(sd, tmp_path / "renamed.bin")
    with pytest.raises(ValueError, match=r"missing keys such as visual\.\S+.*; \d+ unexpected "
                                         r"such as backbone\.visual\."):
        load_embedder("witforge-micro", tmp_path / "renamed.bin")
    with pytest.raises(ValueError, match="embed.model: 'hf-hub:laion/x'.*refused"):
        load_embedder("hf-hub:laion/x", micro)
    with pytest.raises(ValueError, match="embed.model: unknown model 'ViT-Q-99'"):
        load_embedder("ViT-Q-99", micro)

    # through the stage: a StageError naming the build file as well
    cfg = embed_build(tmp_path, str(tmp_path / "nope.pt"))
    crawl_run(cfg, fixture_pairs(2), upstream="image_dedup")
    with pytest.raises(StageError, match=r"embed \(.*b.yaml\): embed.checkpoint: .*nope.pt"):
        run_stage(cfg, "embed", **QUIET)


def test_bf16_precision_stays_close_to_fp32(tmp_path):
    ckpt = random_checkpoint(tmp_path / "m.pt")
    pairs = fixture_pairs(8)
    from training.embed import embed_rows

    cfg = embed_build(tmp_path, str(ckpt))
    crawl_run(cfg, pairs, upstream="image_dedup", per_tar=8)
    rows = [(r["uid"], str(cfg.run_dir / r["tar"]), r["key"], r["caption"])
            for r in read_parquet(cfg.run_dir / "08_image_dedup" / "kept.parquet")]
    a = embed_rows(load_embedder("witforge-micro", ckpt), rows, 4, 2)
    b = embed_rows(load_embedder("witforge-micro", ckpt, precision="bf16"), rows, 4, 0)
    assert a.uids == b.uids and (a.img * b.img).sum(axis=1).min() > 0.99
    assert not np.array_equal(a.img, b.img)  # bf16 really ran


_RUN = """
import sys
from pipeline.config import load_build
from pipeline.stage import run_stage
run_stage(load_build(sys.argv[1]), "embed", log=lambda s: None)
"""


def test_resume_after_kill_redoes_only_unfinished_tars(tmp_path):
    ckpt = random_checkpoint(tmp_path / "tiny.pt", "witforge-tiny")
    pairs = fixture_pairs(96)
    cfg = embed_build(tmp_path, str(ckpt), "witforge-tiny", "  workers: 1\n", batch_size=2)
    crawl_run(cfg, pairs, upstream="image_dedup", per_tar=24)
    work = cfg.run_dir / "10_embed.work" / "parts" / "metadata"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _RUN, str(tmp_path / "b.yaml")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(work.glob("metadata_*.parquet")) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in work.glob("metadata_*.parquet")}
    assert 1 <= len(finished) < 4, finished
    assert not (cfg.run_dir / "10_embed").exists()  # nothing half-written in the stage folder

    report = run_stage(load_build(tmp_path / "b.yaml"), "embed", **QUIET)
    assert report["parts_reused"] == len(finished)
    assert report["images_embedded"] == 24 * (4 - len(finished))
    assert {p: (work / p).stat().st_mtime_ns for p in finished} == finished
    resumed = embeddings.load(cfg.run_dir / "10_embed")
    kept = read_parquet(cfg.run_dir / "10_embed" / "kept.parquet")

    # the same as an uninterrupted run
    (tmp_path / "fresh").mkdir()
    cfg2 = embed_build(tmp_path / "fresh", str(ckpt), "witforge-tiny", "  workers: 1\n",
                       batch_size=2)
    crawl_run(cfg2, pairs, upstream="image_dedup", per_tar=24)
    run_stage(cfg2, "embed", **QUIET)
    fresh = embeddings.load(cfg2.run_dir / "10_embed")
    assert list(resumed.uids) == list(fresh.uids)
    assert np.array_equal(resumed.img, fresh.img) and np.array_equal(resumed.txt, fresh.txt)
    assert kept == read_parquet(cfg2.run_dir / "10_embed" / "kept.parquet")


def test_changed_checkpoint_reruns_and_never_reuses_parts(tmp_path):
    ckpt = random_checkpoint(tmp_path / "m.pt", seed=0)
    cfg = embed_build(tmp_path, str(ckpt))
    crawl_run(cfg, fixture_pairs(8), upstream="image_dedup", per_tar=4)
    first = run_stage(cfg, "embed", **QUIET)
    assert run_stage(cfg, "embed", **QUIET).get("skipped")
    forced = run_stage(cfg, "embed", force=True, **QUIET)
    assert forced["parts_reused"] == 2 and forced["images_embedded"] == 0
    time.sleep(0.01)
    random_checkpoint(ckpt, seed=1)  # the same file name, new weights
    again = run_stage(cfg, "embed", **QUIET)
    assert not again.get("skipped") and again["parts_reused"] == 0
    assert again["clip_score"] != first["clip_score"]


def _train_on_pairs(tmp: Path, pairs, arch: str, steps: int, batch: int) -> Path:
    import webdataset as wds

    tmp.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(tmp / "train-000.tar")) as w:
        for uid, caption, data in pairs:
            w.write({"__key__": uid.replace(".", "_"), "jpg": data, "txt": caption})
    o = TrainOptions(train_data=[str(tmp)], out=str(tmp / "out"), model=arch, steps=steps,
                     batch_size=batch, lr=2e-3, warmup=10, workers=0, save_every=10_000,
                     no_augment=True)
    train(o)
    return tmp / "out" / "model.pt"


def _true_vs_swapped(tmp_path: Path, n: int, arch: str, steps: int, batch: int) -> None:
    pairs = fixture_pairs(n)
    ckpt = _train_on_pairs(tmp_path / "train", pairs, arch, steps, batch)
    swapped = [(f"{u}-swapped", pairs[(i + n // 2) % n][1], d)
               for i, (u, _, d) in enumerate(pairs)]
    cfg = embed_build(tmp_path, str(ckpt), arch)
    crawl_run(cfg, pairs + swapped, upstream="image_dedup", per_tar=64)
    run_stage(cfg, "embed", **QUIET)
    kept = read_parquet(cfg.run_dir / "10_embed" / "kept.parquet")
    true = np.array([r["clip_score"] for r in kept if not r["uid"].endswith("-swapped")])
    false = np.array([r["clip_score"] for r in kept if r["uid"].endswith("-swapped")])
    assert len(true) == len(false) == n
    from training.bootstrap import roc_auc

    assert true.mean() > false.mean() + 0.1 and roc_auc(true, false) > 0.8


def test_matching_pairs_score_higher_than_swapped_with_a_trained_model(tmp_path):
    _true_vs_swapped(tmp_path, 48, "witforge-micro", 60, 24)


@pytest.mark.slow
def test_matching_pairs_score_higher_than_swapped_tiny_on_the_fixture_pool(tmp_path):
    _true_vs_swapped(tmp_path, 290, "witforge-tiny", 300, 64)
