"""The demo web's curation noise on the fixture pool: mismatched and template captions,
near-duplicate copies, placeholders, the head of popular categories, and the truth table,
whose uids the real ingest stage must give the rows."""

from __future__ import annotations

import io
import json
import urllib.request
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from pipeline.config import load_build
from pipeline.demoweb import noise
from pipeline.demoweb.captions import TEMPLATE_FIXED, ingest_caption, ingest_uid
from pipeline.demoweb.manifests import (
    DEFAULT_RATES,
    FAULTS,
    JUNK_KINDS,
    NOISE_KINDS,
    write_manifests,
)
from pipeline.demoweb.pool import FIXTURE_DIR, assemble_pool
from pipeline.demoweb.server import DemoWeb
from pipeline.stage import kept_of, run_stage

MANIFEST_FILES = ["cc3m", "laion", "web", "truth", "faults", "junk", "settings"]


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return assemble_pool(tmp_path_factory.mktemp("noise"), prefer_system=False)


@pytest.fixture(scope="module")
def web(pool_dir: Path):
    # Started before the manifests are written, as `witforge demo` does: the web must find
    # the near-duplicate copies that appear in the pool folder after it started.
    with DemoWeb(pool_dir, slow_seconds=2.0) as w:
        yield w


@pytest.fixture(scope="module")
def written(web, pool_dir, tmp_path_factory) -> dict:
    return write_manifests(pool_dir, web.base_url, tmp_path_factory.mktemp("m"))


@pytest.fixture(scope="module")
def truth(written) -> list[dict]:
    return pq.read_table(written["paths"]["truth"]).to_pylist()


@pytest.fixture(scope="module")
def pool(pool_dir) -> dict[str, dict]:
    return {r["image_id"]: r for r in pq.read_table(pool_dir / "pool.parquet").to_pylist()}


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()


def _rows(paths: dict) -> list[tuple[str, str, str]]:
    return duckdb.sql(
        f"SELECT 'cc3m', column1, coalesce(column0, '') FROM read_csv('{paths['cc3m']}', "
        f"delim='\t', header=false, quote='', escape='', all_varchar=true) UNION ALL "
        f"SELECT 'laion', URL, TEXT FROM read_parquet('{paths['laion']}') UNION ALL "
        f"SELECT 'web', url, alt FROM read_json('{paths['web']}')").fetchall()


def test_truth_has_one_row_per_manifest_row_and_every_kind(written, truth):
    assert Counter(_rows(written["paths"])) == Counter(
        (t["source"], t["url"], t["caption"]) for t in truth)
    kinds = {t["kind"] for t in truth}
    assert set(NOISE_KINDS) | set(JUNK_KINDS) | set(FAULTS) | {
        "clean", "repeat_same_file", "repeat_other_file", "url_variant"} == kinds
    assert {t["transform"] for t in truth if t["kind"] == "near_duplicate"} == set(
        noise.TRANSFORMS)
    assert all(t["uid"] == ingest_uid(t["url"], t["caption"]) for t in truth)
    settings = json.loads(Path(written["paths"]["settings"]).read_text())
    assert settings["rates"] == DEFAULT_RATES and settings["kinds"] == dict(
        sorted(Counter(t["kind"] for t in truth).items()))


def test_rates_hold_on_the_fixture(written, truth, pool):
    """Kinds drawn as a slice of the images hold to one row; near-duplicates are 1-2 copies
    of near_dup_rate of the images; head copies are a hash draw: within +-0.15 of the mean."""
    n, kinds = written["images"], Counter(t["kind"] for t in truth)
    for kind, rate in (("mismatch_other_category", "mismatch_rate"),
                       ("mismatch_same_category", "mismatch_same_rate"),
                       ("template", "template_rate"), ("placeholder", "placeholder_rate")):
        assert abs(kinds[kind] - DEFAULT_RATES[rate] * n) <= 1, kind
    sources = Counter(t["source_image_id"] for t in truth if t["kind"] == "near_duplicate")
    assert abs(len(sources) - DEFAULT_RATES["near_dup_rate"] * n) <= 1
    assert set(sources.values()) == {1, 2}
    head = set(written["head"]["head_categories"])
    assert len(head) == round(DEFAULT_RATES["head_share"] * written["head"]["categories"])
    in_head = sum(r["split"] == "web" and r["category"] in head for r in pool.values())
    assert abs(kinds["head_copy"] / in_head - DEFAULT_RATES["head_extra"]) <= 0.15


def test_mismatched_captions_are_other_images_captions(truth, pool, web):
    rows = [t for t in truth if t["kind"].startswith("mismatch")]
    for t in rows:
        own, donor = pool[t["image_id"]], pool[t["true_image_id"]]
        assert t["caption"] == donor["caption"] != own["caption"]
        assert t["true_caption"] == own["caption"] and t["aligned"] is False
        same = own["category"] == donor["category"]
        assert same == (t["kind"] == "mismatch_same_category"), t
        assert t["url"].endswith("/img/" + Path(own["file"]).name)
    t = rows[0]
    assert _get(t["url"]) == (web.pool_dir / pool[t["image_id"]]["file"]).read_bytes()


def test_template_captions_are_generic_and_some_repeat(truth, pool_dir, web, tmp_path):
    rows = [t for t in truth if t["kind"] == "template"]
    assert all(t["true_image_id"] is None and t["aligned"] is False for t in rows)
    many = write_manifests(pool_dir, web.base_url, tmp_path, template_rate=0.5)
    caps = Counter(t["caption"] for t in pq.read_table(many["paths"]["truth"]).to_pylist()
                   if t["kind"] == "template")
    fixed = {c for c, _ in TEMPLATE_FIXED}
    assert caps.most_common(1)[0][0] == "photo" and caps["photo"] >= 15
    numbered = [c for c in caps if c not in fixed]
    assert len(numbered) > 30 and any(c.startswith("SKU ") for c in numbered)


def test_placeholders_are_the_same_bytes_under_many_urls(truth, pool_dir, web):
    rows = [t for t in truth if t["kind"] == "placeholder"]
    by_ph: dict[str, set[bytes]] = {}
    for t in rows:
        assert t["url"].split("/")[-2] == "media" and t["image_id"] in noise.PLACEHOLDERS
        assert t["caption"] != t["true_caption"] == noise.PLACEHOLDERS[t["image_id"]]
        by_ph.setdefault(t["image_id"], set()).add(_get(t["url"]))
    assert len(by_ph) >= 2 and max(len(rows) for rows in (
        [t for t in rows if t["image_id"] == p] for p in by_ph)) >= 2
    for pid, bodies in by_ph.items():
        assert bodies == {(pool_dir / "derived" / f"{pid}.png").read_bytes()}, pid
        Image.open(io.BytesIO(next(iter(bodies)))).load()
    assert len(set().union(*by_ph.values())) == len(by_ph)  # three different pictures


def _px(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64)


def test_near_duplicates_are_served_transformed_copies(truth, pool, pool_dir, web):
    rows = [t for t in truth if t["kind"] == "near_duplicate"]
    derived = {r["image_id"]: r for r in noise.read_derived(pool_dir)}
    flips = []
    for t in rows:
        body = _get(t["url"])
        src = pool[t["source_image_id"]]
        src_bytes = (pool_dir / src["file"]).read_bytes()
        assert body == (pool_dir / derived[t["image_id"]]["file"]).read_bytes() != src_bytes
        assert t["true_image_id"] == src["image_id"] and t["aligned"] is True
        assert src["caption"] in t["caption"] and t["true_caption"] == src["caption"]
        copy, orig = _px(body), _px(src_bytes)
        h, w = copy.shape[:2]
        if t["transform"] == "resize":
            assert w < src["width"] and h < src["height"]
        if t["transform"] == "crop":
            assert 0.65 * src["width"] <= w < src["width"]
        if t["transform"] == "border":
            assert w > src["width"] and h > src["height"]
        if t["transform"] == "flip":
            assert (w, h) == (src["width"], src["height"])
            mirrored = np.asarray(ImageOps.mirror(Image.open(pool_dir / src["file"])
                                                  .convert("RGB")), dtype=np.float64)
            if np.abs(orig - mirrored).mean() > 5:  # not left-right symmetric
                flips.append((np.abs(copy - mirrored).mean(), np.abs(copy - orig).mean()))
    assert flips and all(to_mirror < 3 and to_mirror * 2 < to_orig
                         for to_mirror, to_orig in flips), flips


def test_head_copies_repost_the_largest_categories(written, truth, pool, web):
    head = set(written["head"]["head_categories"])
    rows = [t for t in truth if t["kind"] == "head_copy"]
    assert rows and all(pool[t["image_id"]]["category"] in head for t in rows)
    assert all(pool[t["image_id"]]["caption"] in t["caption"] for t in rows)
    t = rows[0]
    assert "/p/" in t["url"] and _get(t["url"]) == (
        web.pool_dir / pool[t["image_id"]]["file"]).read_bytes()
    assert written["head"]["top10pct_share_rows"] > written["head"]["top10pct_share_images"]


def test_writes_are_byte_identical_per_seed(written, pool_dir, web, tmp_path):
    derived = (pool_dir / "derived.parquet").read_bytes()
    again = write_manifests(pool_dir, web.base_url, tmp_path / "a")
    for key in MANIFEST_FILES:
        assert Path(again["paths"][key]).read_bytes() == Path(
            written["paths"][key]).read_bytes(), key
    assert (pool_dir / "derived.parquet").read_bytes() == derived
    other = write_manifests(pool_dir, web.base_url, tmp_path / "b", seed=1)
    assert Path(other["paths"]["truth"]).read_bytes() != Path(
        written["paths"]["truth"]).read_bytes()
    # seed 1's copies join the catalogue; seed 0's stay servable
    ids = {r["image_id"] for r in noise.read_derived(pool_dir)}
    assert {t["image_id"] for t in pq.read_table(written["paths"]["truth"]).to_pylist()
            if t["kind"] == "near_duplicate"} <= ids


def test_the_committed_fixture_is_not_written_into(tmp_path):
    with pytest.raises(ValueError, match="committed fixture"):
        write_manifests(FIXTURE_DIR, "http://127.0.0.1:1", tmp_path)
    write_manifests(FIXTURE_DIR, "http://127.0.0.1:1", tmp_path, near_dup_rate=0,
                    placeholder_rate=0)
    assert not (FIXTURE_DIR / "derived").exists()
    assert not (FIXTURE_DIR / "derived.parquet").exists()


def test_ingest_gives_every_row_the_uid_truth_names(written, truth, tmp_path):
    d = Path(written["paths"]["cc3m"]).parent
    (tmp_path / "b.yaml").write_text(
        f"name: t\nruns_dir: {tmp_path / 'runs'}\nsources:\n"
        f"  - {{path: {d / 'cc3m.tsv'}, format: tsv, header: false, caption_col: column0, "
        f"url_col: column1, tag: cc3m}}\n"
        f"  - {{path: {d / 'laion.parquet'}, url_col: URL, caption_col: TEXT, tag: laion}}\n"
        f"  - {{path: {d / 'web.jsonl'}, url_col: url, caption_col: alt, tag: web}}\n")
    cfg = load_build(tmp_path / "b.yaml")
    run_stage(cfg, "ingest", log=lambda s: None)
    kept = duckdb.sql(f"SELECT uid, url, caption FROM '{kept_of(cfg, 'ingest')}'").fetchall()
    dropped = duckdb.sql(f"SELECT uid, reason FROM "
                         f"'{kept_of(cfg, 'ingest').parent / 'dropped.parquet'}'").fetchall()
    by_uid: dict[str, list[dict]] = {}
    for t in truth:
        by_uid.setdefault(t["uid"], []).append(t)
    assert len(kept) + len(dropped) == len(truth)
    assert {r for _, r in dropped} == {"exact_repeat"}
    assert len(dropped) == sum(t["kind"].startswith("repeat_") for t in truth)
    for uid, url, caption in kept:
        ts = by_uid[uid]
        assert ts[0]["url"] == url and ingest_caption(ts[0]["caption"]) == caption
        if len(ts) == 1:
            assert not ts[0]["kind"].startswith("repeat_")
        else:  # an exact repeat: the original and its repeat, one pair
            assert sorted(t["kind"].startswith("repeat_") for t in ts) == [False, True]
    assert {u for u, _ in dropped} <= {u for u, _, _ in kept}
    assert {u for u, _, _ in kept} == set(by_uid)
    kinds = Counter(by_uid[u][0]["kind"] for u, _, _ in kept)
    assert kinds["mismatch_other_category"] > 0 and kinds["near_duplicate"] > 0
