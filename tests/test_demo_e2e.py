"""The demo build end to end: pool → demo web → every stage → training → evaluation.

CI runs a small version (the committed fixture pool, a few training steps); the full
`make demo` (Debian pool, 150 steps) is marked slow: `make test-slow`.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import duckdb
import pytest

from pipeline.arms import arm_config, run_arm
from pipeline.cli import main as cli_main
from pipeline.config import BuildConfig, load_build
from pipeline.crawl import image_tar
from pipeline.demo import apply_demo_settings
from pipeline.demo import main as demo_main
from pipeline.ledger import audit
from pipeline.stage import get_spec, kept_of, stage_dir

REPO = Path(__file__).resolve().parents[1]


def _demo_build(tmp_path: Path, steps: int) -> Path:
    """manifests/demo.yaml, moved so its ../demo_data and runs live under tmp_path."""
    (tmp_path / "manifests").mkdir()
    shutil.copytree(REPO / "manifests" / "filters", tmp_path / "manifests" / "filters")
    text = (REPO / "manifests" / "demo.yaml").read_text()
    text = text.replace("name: demo\n", f"name: demo\nruns_dir: {tmp_path / 'runs'}\n")
    # the training recipe's steps and the bootstrap folds' (the same recipe)
    text = re.sub(r"(?m)^(\s+steps:) 150\b", rf"\g<1> {steps}", text)
    assert text.count(f"steps: {steps}") == 2, "demo.yaml's steps are no longer where expected"
    y = tmp_path / "manifests" / "demo.yaml"
    y.write_text(text)
    return y


def _check_build(y: Path) -> None:
    cfg = load_build(y)
    results = audit(cfg)
    # Every stage ran, and every row of every stage is accounted for.
    assert [a.folder for a in results][0] == "01_ingest"
    assert results[-1].folder == "14_shard" and results[-1].kept > 0
    assert all(a.ok for a in results), [a.problems for a in results]
    # The injected faults end with their reasons, not as crashes or silent losses.
    reasons = {r for a in results for r in a.by_reason}
    for expected in ("exact_repeat", "robots_disallowed", "http_404", "http_5xx",
                     "disallowed_header", "redirect_loop", "deadline_exceeded",
                     "duplicate_image_sha256", "duplicate_url_caption"):
        assert expected in reasons, f"{expected} missing from {sorted(reasons)}"
    # Nothing the demo web held out for evaluation reached the shards.
    pool = y.parent.parent / "demo_data" / "pool" / "pool.parquet"
    by_split = dict(duckdb.sql(rf"""
        SELECT p.split, count(*) FROM '{kept_of(cfg, 'shard')}' k
        JOIN '{pool}' p ON regexp_extract(k.url, '/([^/.]+)(\.[a-z]+)?$', 1) = p.image_id
        GROUP BY 1""").fetchall())
    assert by_split.get("web", 0) > 0 and by_split.get("heldout", 0) == 0
    summary = json.loads((cfg.run_dir / "eval" / "summary.json").read_text())
    arms = summary["summary"]["arms"]
    assert set(arms) == {"curated", "raw"} and summary["samples_seen"] > 0
    # equal samples seen, whatever each arm holds; raw holds every crawled row, curation less
    assert arms["raw"]["samples"] > arms["curated"]["samples"] > 0
    # zero-shot sets: Fashion-MNIST needs its Debian package and the fixture pool holds too
    # few held-out images per category, so a fresh machine's fixture demo may have none
    # (test_evaluate and test_clip_benchmark cover zero-shot itself)
    zeroshot = [p for p in cfg.eval.zeroshot if (cfg.resolve(p) / "test").is_dir()]
    for scores in summary["runs"].values():
        for per_seed in scores.values():
            assert any(k.endswith("/t2i_R@5") for k in per_seed)
            assert {k.split("/")[0] for k in per_seed if k.endswith("/zeroshot_top1")} == {
                Path(p).name for p in zeroshot}
    # the raw arm crawled what curation dropped before the crawl: the rows text_filter and
    # url_dedup dropped (robots still applies) came in one more crawl attempt
    raw = arm_config(cfg, "raw")
    raw_crawl = json.loads((stage_dir(raw, get_spec("crawl")) / "report.json").read_text())
    filtered = sum(json.loads((stage_dir(cfg, get_spec(s)) / "report.json").read_text())
                   ["dropped"] for s in ("text_filter", "url_dedup"))
    assert raw_crawl["rows_in"] >= filtered + json.loads(
        (stage_dir(cfg, get_spec("crawl")) / "report.json").read_text())["rows_in"] - 5
    assert raw_crawl["attempts"] == 2
    assert (cfg.run_dir / "train" / "model.pt").is_file()
    assert (cfg.run_dir / "train_raw" / "model.pt").is_file()
    md = (cfg.run_dir / "eval" / "summary.md").read_text()
    assert md.startswith("| metric") and "One seed is not evidence" in md


def test_demo_end_to_end_on_the_fixture(tmp_path: Path) -> None:
    y = _demo_build(tmp_path, steps=2)
    assert demo_main(["--build", str(y), "--fixture-only"]) == 0
    _check_build(y)
    # A rerun finds every stage up to date and trains nothing again.
    cfg = load_build(y)
    before = (cfg.run_dir / "14_shard" / "report.json").stat().st_mtime_ns
    raw = stage_dir(arm_config(cfg, "raw"), get_spec("shard"))
    raw_before = (raw / "report.json").stat().st_mtime_ns
    assert demo_main(["--build", str(y), "--fixture-only"]) == 0
    assert (cfg.run_dir / "14_shard" / "report.json").stat().st_mtime_ns == before
    assert (raw / "report.json").stat().st_mtime_ns == raw_before
    assert cli_main(["status", "--build", str(y), "--check"]) == 0  # nothing left to run
    _raw_baseline_ignores_the_order_of_the_crawl_tars(cfg)
    # ablations whose rows differ before embed score with the build's bootstrap fold models;
    # those after it (balance) keep the build's embed stage as it is
    assert arm_config(cfg, "no_text_filter").embed.bootstrap.models_from == str(cfg.run_dir)
    assert arm_config(cfg, "no_balance").embed.bootstrap.models_from == ""
    # A single stage of the demo build, outside `witforge demo`, serves the demo web again
    # at the manifests' address: a crawl from scratch gets the same images.
    kept = json.loads((cfg.run_dir / "06_crawl" / "report.json").read_text())["kept"]
    shutil.rmtree(cfg.run_dir / "06_crawl.work")
    assert cli_main(["crawl", "--build", str(y), "--force"]) == 0
    report = json.loads((cfg.run_dir / "06_crawl" / "report.json").read_text())
    assert report["kept"] == kept and report["downloaded_images"] == kept


def _shard_hashes(folder: Path) -> list[tuple[str, str]]:
    return duckdb.sql(f"SELECT shard, sha256 FROM '{folder / 'shards.parquet'}' "
                      "ORDER BY shard").fetchall()


def _raw_baseline_ignores_the_order_of_the_crawl_tars(cfg: BuildConfig) -> None:
    """The raw arm trains on every crawled image sharded by the shard stage's writer with the
    build's seed, so the order in which img2dataset's threads wrote a tar does not change it."""
    apply_demo_settings(cfg)  # as every command on a demo build (the eval sets made here)
    raw = arm_config(cfg, "raw")
    shards = stage_dir(raw, get_spec("shard"))
    hashes = _shard_hashes(shards)
    crawled = duckdb.sql(f"SELECT count(*) FROM '{kept_of(raw, 'crawl')}'").fetchall()[0][0]
    kept = duckdb.sql(f"SELECT count(*) FROM '{kept_of(raw, 'shard')}'").fetchall()[0][0]
    assert sum(json.loads((shards / "sizes.json").read_text()).values()) == kept
    assert crawled - kept == json.loads((stage_dir(raw, get_spec("decontaminate"))
                                         / "report.json").read_text())["dropped"]
    tars = duckdb.sql(f"SELECT DISTINCT tar FROM '{kept_of(raw, 'crawl')}'").fetchall()
    for (t,) in tars:  # the same members, written in the opposite order
        path = image_tar(raw, t)
        with tarfile.open(path) as src:
            members = [(m, src.extractfile(m).read()) for m in src.getmembers() if m.isfile()]
        path.unlink()  # a hard link to the build's own tar: write a new file
        with tarfile.open(path, "w") as dst:
            for m, data in reversed(members):
                dst.addfile(m, io.BytesIO(data))
    shutil.rmtree(shards)
    run_arm(cfg, "raw", [cfg], log=lambda s: None)
    assert _shard_hashes(stage_dir(raw, get_spec("shard"))) == hashes


@pytest.mark.slow
def test_full_demo(tmp_path: Path) -> None:
    y = _demo_build(tmp_path, steps=150)
    assert demo_main(["--build", str(y)]) == 0
    _check_build(y)
