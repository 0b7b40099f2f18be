"""Benchmark: the embed stage's loop against the loop a user would write, and the bootstrap.

Data: crawl-style tars (img2dataset's ``<key>.jpg/.txt/.json``) of the committed fixture pool's
real clip art, re-encoded as the demo crawl stores it (64 px JPEG, quality 90) and cycled to
``n`` samples. Both sides embed the same tars with the same model (``ViT-B-32`` with random
weights — the architecture LAION and DataComp score with; nothing is downloaded — and the
demo's ``witforge-tiny``), batch size, torch threads and decoding workers:

* ours — ``training.embed.embed_rows`` as the stage runs it (images read by tar member, decoded
  and preprocessed on threads while the model encodes the previous batch);
* straightforward — ``webdataset.WebDataset(tars).decode("pil").to_tuple("jpg", "txt")``,
  open_clip's preprocess, a torch ``DataLoader`` with the same worker count, then
  ``encode_image/encode_text(normalize=True)`` under ``inference_mode``.

Sides alternate, each in a fresh process, best of ``repeats``; images/s per core = images/s /
cores. Both sides' embeddings are compared (they must agree).

Bootstrap: ``checkpoint: bootstrap`` with the demo recipe (3 folds, witforge-tiny, 150 steps x
64) on ``n_boot`` fixture pairs, wall seconds per 1k pairs (training dominates: it is 3 x 150 x 64
samples whatever the pool size, so per 1k pairs falls as the pool grows).

``python -m bench.bench_embed [--quick]`` writes bench/results/embed.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "embed.json"
DATA = REPO / "bench" / "data" / "embed"
THREADS = 2
WORKERS = 2


def make_tars(n: int, per_tar: int = 500) -> list[Path]:
    """n samples of the fixture pool's images as 64 px JPEGs in crawl-style tars."""
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.demoweb.pool import FIXTURE_DIR

    out = DATA / f"tars_{n}"
    done = out / "_SUCCESS"
    tars = sorted(out.glob("*.tar"))
    if done.is_file():
        return tars
    out.mkdir(parents=True, exist_ok=True)
    pool = pq.read_table(FIXTURE_DIR / "pool.parquet").to_pylist()
    encoded = []
    for r in pool:
        with Image.open(FIXTURE_DIR / r["file"]) as im:
            im = im.convert("RGB").resize((64, 64))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
        encoded.append((buf.getvalue(), r["caption"]))
    for t in range(0, n, per_tar):
        with tarfile.open(out / f"{t // per_tar:05d}.tar", "w") as tf:
            for i in range(t, min(n, t + per_tar)):
                data, cap = encoded[i % len(encoded)]
                key = f"{t // per_tar:05d}{i - t:04d}"
                for ext, payload in (("jpg", data), ("txt", cap.encode()),
                                     ("json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    done.write_text("")
    return sorted(out.glob("*.tar"))


def _checkpoint(arch: str) -> Path:
    """A random-weights checkpoint of ``arch`` saved as open_clip releases save theirs."""
    import open_clip
    import torch

    path = DATA / f"{arch}-random.bin"
    if not path.is_file():
        torch.manual_seed(0)
        model = open_clip.create_model(arch, pretrained=None)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return path


def side(which: str, arch: str, tars: list[str], batch: int) -> dict:
    """One side, in this process: images/s and a checksum of the embeddings."""
    import numpy as np
    import torch

    torch.set_num_threads(THREADS)
    from training.embed import embed_rows, load_embedder

    emb = load_embedder(arch, _checkpoint(arch), "cpu")
    t0 = time.perf_counter()
    if which == "ours":
        rows = []
        for t in tars:
            with tarfile.open(t) as tf:
                keys = sorted({m.name.rsplit(".", 1)[0] for m in tf.getmembers()})
                caps = {m.name[:-4]: tf.extractfile(m).read().decode()
                        for m in tf.getmembers() if m.name.endswith(".txt")}
            rows += [(f"{Path(t).stem}/{k}", t, k, caps[k]) for k in keys]
        t0 = time.perf_counter()  # listing the tars is the stage's parquet read, not embedding
        got = embed_rows(emb, rows, batch, WORKERS)
        img, txt = got.img, got.txt
    else:
        import webdataset as wds

        ds = (wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode("pil")
              .to_tuple("jpg", "txt").map_tuple(emb.preprocess, lambda s: s))
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=WORKERS)
        imgs, txts = [], []
        with torch.inference_mode():
            for images, captions in loader:
                imgs.append(emb.model.encode_image(images, normalize=True).numpy())
                txts.append(emb.model.encode_text(emb.tokenizer(list(captions)),
                                                  normalize=True).numpy())
        img, txt = np.concatenate(imgs), np.concatenate(txts)
    seconds = time.perf_counter() - t0
    return {"images": len(img), "seconds": round(seconds, 3),
            "images_per_s": round(len(img) / seconds, 2),
            "img_sum": float(np.abs(img).sum()), "txt_sum": float(np.abs(txt).sum())}


def _run_side(which: str, arch: str, tars: list[Path], batch: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.bench_embed", "--side", which, arch,
                          str(batch), *map(str, tars)], cwd=REPO, capture_output=True,
                         text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{which} {arch} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bootstrap_seconds(n: int, steps: int) -> dict:
    """checkpoint: bootstrap with the demo recipe on n fixture pairs (real stage runner)."""
    import tempfile

    from pipeline.stage import run_stage
    from tests.curation_fixtures import crawl_run, make_build
    from tests.test_embed import fixture_pairs

    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_build(Path(tmp), "embed:\n  checkpoint: bootstrap\n  batch_size: 128\n"
                                    f"  bootstrap:\n    steps: {steps}\n")
        pool = fixture_pairs(290)  # the whole fixture, cycled (timing, not quality)
        pairs = [(f"{pool[i % len(pool)][0]}-{i // len(pool)}", *pool[i % len(pool)][1:])
                 for i in range(n)]
        crawl_run(cfg, pairs, upstream="image_dedup", per_tar=500)
        t0 = time.perf_counter()
        report = run_stage(cfg, "embed", log=lambda s: None)
        seconds = time.perf_counter() - t0
    folds = report["bootstrap"]["folds"]
    return {"pairs": n, "folds": len(folds), "steps": steps, "seconds": round(seconds, 1),
            "seconds_per_1k_pairs": round(1000 * seconds / n, 1),
            "train_seconds": [f.get("train_seconds") for f in folds]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--side"]:
        print(json.dumps(side(argv[1], argv[2], argv[4:], int(argv[3]))))
        return 0
    p = argparse.ArgumentParser(prog="bench_embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    cases = ([("witforge-tiny", 1000, 128), ("ViT-B-32", 128, 64)] if a.quick else
             [("witforge-tiny", 5000, 256), ("ViT-B-32", 1000, 64)])
    repeats = 1 if a.quick else 2
    rows = []
    for arch, n, batch in cases:
        tars = make_tars(n)
        runs = {"ours": [], "straightforward": []}
        for _ in range(repeats):
            for which in runs:
                runs[which].append(_run_side(which, arch, tars, batch))
        best = {w: max(r, key=lambda x: x["images_per_s"]) for w, r in runs.items()}
        agree = (abs(best["ours"]["img_sum"] - best["straightforward"]["img_sum"])
                 / best["straightforward"]["img_sum"])
        row = {"model": arch, "images": n, "batch_size": batch, "threads": THREADS,
               "workers": WORKERS, "runs": runs,
               "ours_images_per_s_per_core": round(best["ours"]["images_per_s"] / THREADS, 2),
               "straightforward_images_per_s_per_core": round(
                   best["straightforward"]["images_per_s"] / THREADS, 2),
               "ratio": round(best["ours"]["images_per_s"]
                              / best["straightforward"]["images_per_s"], 3),
               "embedding_sums_relative_difference": agree}
        rows.append(row)
        print(f"embed {arch} x {n}: ours {row['ours_images_per_s_per_core']} img/s/core, "
              f"straightforward {row['straightforward_images_per_s_per_core']}, "
              f"ratio {row['ratio']} (embeddings agree to {agree:.1e})", flush=True)
    boot = bootstrap_seconds(290 if a.quick else 1160, 20 if a.quick else 150)
    print(f"bootstrap {boot['folds']} folds x {boot['steps']} steps on {boot['pairs']} pairs: "
          f"{boot['seconds']} s = {boot['seconds_per_1k_pairs']} s per 1k pairs", flush=True)
    result = {"quick": a.quick, "machine": {"cores": os.cpu_count(),
                                            "python": platform.python_version()},
              "embed": rows, "bootstrap": boot,
              "summary": {r["model"]: {"ratio": r["ratio"],
                                       "ours_per_core": r["ours_images_per_s_per_core"]}
                          for r in rows} | {"bootstrap_s_per_1k": boot["seconds_per_1k_pairs"]}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
