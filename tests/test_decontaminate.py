"""Decontamination against eval sets in CLIP_benchmark's WebDataset layout (real tars)."""

from __future__ import annotations

import pytest

from dedup.phash import phash_bytes
from pipeline.config import load_build
from pipeline.stage import StageError, run_stage
from tests.curation_fixtures import (
    crawl_run,
    drawn_image,
    jpeg,
    make_build,
    mark_done,
    png,
    read_parquet,
    write_tar,
)


def _eval_set(root, name: str, seeds: list[int]) -> None:
    """<root>/<name>/test/0.tar with s<i>.png + s<i>.cls, and classnames.txt."""
    members = []
    for i, seed in enumerate(seeds):
        members += [(f"s{i:07d}.png", png(drawn_image(seed, 64))), (f"s{i:07d}.cls", b"0")]
    write_tar(root / name / "test" / "0.tar", members)
    (root / name / "classnames.txt").write_text("thing\n")


@pytest.mark.parametrize("with_phash", [True, False])
def test_decontaminate_drops_near_copies_of_eval_images(tmp_path, with_phash):
    _eval_set(tmp_path / "evals", "shapes", [500, 501, 502])
    _eval_set(tmp_path / "evals", "blobs", [600])
    cfg = make_build(tmp_path, "decontaminate:\n  max_distance: 6\n  eval_sets: "
                     "[evals/shapes, evals/blobs]\n")
    leaked = drawn_image(501, 64).resize((180, 180))  # an eval image, upscaled and re-encoded
    samples = [("t1", "leaked eval image", jpeg(leaked, 60)),
               ("t2", "another leak", jpeg(drawn_image(600, 64), 50))]
    samples += [(f"k{i}", "training picture", jpeg(drawn_image(700 + i, 180), 85))
                for i in range(8)]
    rows = crawl_run(cfg, samples, upstream="image_dedup")
    if with_phash:  # what image_dedup leaves: its phash column
        for r, (_, _, data) in zip(rows, samples, strict=True):
            r["phash"] = phash_bytes(data)
        mark_done(cfg, "image_dedup", rows)
    report = run_stage(cfg, "decontaminate", log=lambda s: None)

    folder = cfg.run_dir / "09_decontaminate"
    kept = read_parquet(folder / "kept.parquet")
    dropped = {r["uid"]: r for r in read_parquet(folder / "dropped.parquet")}
    assert sorted(r["uid"] for r in kept) == [f"k{i}" for i in range(8)]
    assert dropped["t1"]["reason"] == "eval_contamination"
    assert dropped["t1"]["detail"] == "shapes/test/0.tar:s0000001"
    assert dropped["t2"]["detail"] == "blobs/test/0.tar:s0000000"
    assert report["rows_in"] == len(kept) + len(dropped) == len(samples)
    assert report["eval_images_checked"] == 4
    assert report["eval_images_by_set"] == {"blobs": 1, "shapes": 3}
    assert report["contaminated_by_set"] == {"blobs": 1, "shapes": 1}
    assert all(r["phash"] == phash_bytes(d) for r, (u, _, d) in
               zip(kept, [s for s in samples if s[0].startswith("k")], strict=True))


def test_changed_eval_set_reruns_and_missing_set_is_an_error(tmp_path):
    _eval_set(tmp_path / "evals", "shapes", [500])
    cfg = make_build(tmp_path, "decontaminate:\n  eval_sets: [evals/shapes]\n")
    crawl_run(cfg, [("k0", "x", jpeg(drawn_image(501, 64).resize((100, 100)))),
                    ("k1", "y", jpeg(drawn_image(502, 100)))], upstream="image_dedup")
    first = run_stage(cfg, "decontaminate", log=lambda s: None)
    assert first["dropped"] == 0
    _eval_set(tmp_path / "evals", "shapes", [500, 501])  # the eval set gains k0's picture
    second = run_stage(cfg, "decontaminate", log=lambda s: None)
    assert not second.get("skipped") and second["dropped_by_reason"] == {"eval_contamination": 1}

    (tmp_path / "b.yaml").write_text((tmp_path / "b.yaml").read_text()
                                     .replace("evals/shapes", "evals/nope"))
    with pytest.raises(StageError, match="evals/nope"):
        run_stage(load_build(tmp_path / "b.yaml"), "decontaminate", log=lambda s: None)
