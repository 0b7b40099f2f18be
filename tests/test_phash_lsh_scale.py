"""pHash's draft decode and the LSH join at scale: multi-block tables, hot-bucket caps."""

from __future__ import annotations

import io
import itertools
import random
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from dedup.lsh import auto_blocks, band_layout, near_pairs, table_masks
from dedup.phash import draft_grey, draft_scale, hamming, phash_bytes
from pipeline.config import ConfigError
from pipeline.stage import fingerprint_of, get_spec, run_stage, stage_inputs
from tests.curation_fixtures import crawl_run, drawn_image, jpeg, make_build, png, read_parquet

REAL = sorted((Path(__file__).parent / "data" / "real_images").glob("*.png"))


def _crawl_jpeg(path: Path, side: int) -> bytes:
    """A real clip-art PNG as the crawl stores it: on white, longer side ``side``, q95."""
    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    img = Image.new("RGB", rgba.size, "white")
    img.paste(rgba, mask=rgba.getchannel("A"))
    s = side / max(img.size)
    return jpeg(img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))),
                           Image.Resampling.LANCZOS), 95)


def _con(hashes: list[int] | np.ndarray, name: str = "t") -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.register(name, pa.table({"id": np.arange(len(hashes)),
                                 "h": pa.array(np.asarray(hashes, np.uint64), pa.uint64())}))
    return con


def _flip(rnd: random.Random, h: int, d: int, bits: range = range(64)) -> int:
    return h ^ sum(1 << b for b in rnd.sample(list(bits), d))


# ---- pHash draft decode -------------------------------------------------------------------

@pytest.mark.parametrize("side", [64, 256, 512])
def test_draft_decodes_the_same_pixels_with_opencv_and_pil(side):
    assert len(REAL) == 7
    for data in [_crawl_jpeg(p, side) for p in REAL] + [jpeg(drawn_image(s, side)) for s in
                                                         range(5)]:
        fast, pil = draft_grey(data), draft_grey(data, use_cv2=False)
        assert fast.mode == pil.mode == "L"
        assert np.array_equal(np.asarray(fast), np.asarray(pil))
        with Image.open(io.BytesIO(data)) as im:
            s = draft_scale(*im.size)
            assert fast.size == (-(-im.width // s), -(-im.height // s))
            assert min(fast.size) >= 32 or s == 1


def test_draft_handles_progressive_grey_and_cmyk_jpegs():
    for mode in ("RGB", "L", "CMYK"):
        for progressive in (False, True):
            buf = io.BytesIO()
            drawn_image(4, 300).convert(mode).save(buf, "JPEG", quality=85,
                                                   progressive=progressive)
            data = buf.getvalue()
            fast, pil = draft_grey(data), draft_grey(data, use_cv2=False)
            assert np.array_equal(np.asarray(fast), np.asarray(pil)), (mode, progressive)
            # CMYK has no luma channel to decode alone: it takes the exact path
            assert (fast.size == (300, 300)) == (mode == "CMYK")
            if mode == "CMYK":
                assert phash_bytes(data, "draft") == phash_bytes(data)


def test_draft_hashes_agree_with_exact_within_the_measured_agreement():
    # bench/bench_phash.py on the 8,102 openclipart images: most within a few bits; on these
    # committed ones (real clip art and drawn shapes) every hash is within k = 4 of exact
    diffs = []
    for side in (64, 256, 512):
        diffs += [hamming(phash_bytes(d), phash_bytes(d, "draft")) for d in
                  [_crawl_jpeg(p, side) for p in REAL]
                  + [jpeg(drawn_image(s, side), 90) for s in range(10)]]
    assert max(diffs) <= 4
    assert sum(d == 0 for d in diffs) >= len(diffs) * 0.6
    # and draft really is another decode: some hashes differ
    assert any(diffs)


def test_draft_takes_the_exact_path_for_other_formats_and_broken_bytes():
    img = drawn_image(3, 200)
    assert phash_bytes(png(img), "draft") == phash_bytes(png(img))
    truncated = jpeg(img)[:-200]
    for decode in ("exact", "draft"):
        with pytest.raises(OSError):
            phash_bytes(truncated, decode)
    with pytest.raises(ValueError, match="exact, draft"):
        phash_bytes(png(img), "fast")


def test_phash_decode_setting_is_validated_and_changes_the_fingerprint(tmp_path):
    with pytest.raises(ConfigError, match="image_dedup.phash_decode"):
        make_build(tmp_path / "bad", "image_dedup:\n  phash_decode: fast\n")
    with pytest.raises(ConfigError, match="image_dedup.lsh_max_bucket"):
        make_build(tmp_path / "bad2", "image_dedup:\n  lsh_max_bucket: -1\n")
    spec = get_spec("image_dedup")
    fps = {d: fingerprint_of(stage_inputs(make_build(tmp_path / d,
                                                     f"image_dedup:\n  phash_decode: {d}\n"),
                                          spec, "up")) for d in ("exact", "draft")}
    assert fps["exact"] != fps["draft"]
    # decontaminate hashes its eval images the same way, so the setting is in its inputs too
    dc = get_spec("decontaminate")
    a = make_build(tmp_path / "a", "image_dedup:\n  phash_decode: draft\n")
    b = make_build(tmp_path / "b")
    assert fingerprint_of(stage_inputs(a, dc, "up")) != fingerprint_of(stage_inputs(b, dc, "up"))


def test_image_dedup_stage_with_draft_decode(tmp_path):
    cfg = make_build(tmp_path, "image_dedup:\n  phash_decode: draft\n")
    base = drawn_image(1, 256)
    samples = [("u1", "a", jpeg(base, 90)), ("u2", "recompressed", jpeg(base, 40)),
               ("u3", "other", jpeg(drawn_image(2, 256), 90)),
               ("u4", "real clip art", _crawl_jpeg(REAL[0], 256))]
    crawl_run(cfg, samples, upstream="image_filter", per_tar=2)
    run_stage(cfg, "image_dedup", log=lambda s: None)
    folder = cfg.run_dir / "08_image_dedup"
    kept = {r["uid"]: r for r in read_parquet(folder / "kept.parquet")}
    assert set(kept) == {"u1", "u3", "u4"}
    for uid, _, data in samples:
        if uid in kept:  # the stage's hash is the draft one, from the draft cache
            assert kept[uid]["phash"] == phash_bytes(data, "draft")
    assert read_parquet(folder / "dropped.parquet")[0]["reason"] == "near_duplicate_image"
    # back to exact: a rerun, with hashes from the exact path (its own cache entries)
    cfg.image_dedup.phash_decode = "exact"
    assert not run_stage(cfg, "image_dedup", log=lambda s: None).get("skipped")
    kept = {r["uid"]: r for r in read_parquet(folder / "kept.parquet")}
    assert kept["u4"]["phash"] == phash_bytes(samples[3][2])


# ---- LSH: multi-block tables --------------------------------------------------------------

def _brute(hashes: list[int], k: int) -> set[tuple[int, int]]:
    return {(i, j) for i, j in itertools.combinations(range(len(hashes)), 2)
            if hamming(hashes[i], hashes[j]) <= k}


@pytest.mark.parametrize("k,blocks", [(4, 5), (4, 6), (4, 7), (2, 4), (6, 8)])
def test_every_block_layout_finds_exactly_the_brute_force_pairs(k, blocks):
    rnd = random.Random(blocks * 10 + k)
    hashes = [rnd.getrandbits(64) for _ in range(250)]
    hashes += [_flip(rnd, hashes[i], rnd.randint(0, k + 2)) for i in range(250)]
    con = _con(hashes)
    st: dict = {}
    near_pairs(con, "t", None, k, blocks, "pairs", stats=st)
    got = {(a, b) for a, b in con.execute("SELECT a, b FROM pairs").fetchall()}
    assert got == _brute(hashes, k)
    assert st["tables"] == len(table_masks(blocks, k)) and st["recall_complete"]


def test_table_masks_choose_b_minus_k_blocks():
    masks = table_masks(6, 4)
    assert len(masks) == 15 and {bin(m).count("1") for m in masks} == {20, 21, 22}
    blocks = [m << s for _, s, m in band_layout(6)]
    assert all(sum(1 for b in blocks if m & b == b) == 2 for m in masks)
    # B <= k: one block per table (the old banded LSH, which can miss pairs)
    assert table_masks(3, 4) == [m << s for _, s, m in band_layout(3)]


def test_auto_blocks_widen_the_keys_as_rows_grow():
    assert auto_blocks(4, 10_000) == 5
    assert auto_blocks(4, 1_000_000) == 6
    assert auto_blocks(4, 100_000_000) == 7
    assert auto_blocks(4, 1_000_000, 50) == 5  # a small other side: few candidates anyway


# ---- LSH: hot buckets ---------------------------------------------------------------------

def test_hot_bucket_is_capped_keeps_planted_pairs_and_bounds_the_work():
    """50k rows share one block (a hot key in one of the 5 one-block tables): uncapped they
    make 1.25e9 candidate pairs; capped at 1000 representatives, ~5e7."""
    rng = np.random.default_rng(7)
    rnd = random.Random(7)
    _, shift, mask = band_layout(5)[0]
    others = [b for b in range(64) if not shift <= b < shift + mask.bit_length()]
    bulk = rng.integers(0, 2**63, size=20_000, dtype=np.uint64).astype(object).tolist()
    hot = [(int(x) & ~(mask << shift)) | (0x155 << shift) for x in
           rng.integers(0, 2**63, size=50_000, dtype=np.uint64)]
    n0 = len(bulk) + len(hot)
    src = list(range(1000)) + list(range(len(bulk), len(bulk) + 1000))
    base = bulk + hot
    dups = [_flip(rnd, base[i], rnd.randint(1, 4), others if i >= len(bulk) else range(64))
            for i in src]
    hashes = base + dups
    planted = [(i, n0 + j) for j, i in enumerate(src)]
    con = _con(hashes)
    st: dict = {}
    near_pairs(con, "t", None, 4, 5, "pairs", stats=st, count_candidates=True)
    got = {(a, b): d for a, b, d in con.execute("SELECT a, b, distance FROM pairs").fetchall()}
    assert st["hot_buckets"] == 1 and st["largest_hot_bucket"] >= 50_000
    assert not st["recall_complete"]
    assert st["candidates"] < 60_000_000  # uncapped: > 50_000 ** 2 / 2
    assert st["candidates_capped_away"] > 1_000_000_000
    assert all(hamming(hashes[a], hashes[b]) == d <= 4 for (a, b), d in got.items())
    assert all(p in got for p in planted[:1000])  # outside the hot bucket: every pair
    inside = sum(p in got for p in planted[1000:]) / 1000
    assert inside >= 0.97  # inside: pairs sharing only the hot key may be lost


def test_dense_cluster_stays_connected_through_its_representatives():
    """A logo re-encoded 3,000 times: every copy within 2 bits of one centre, all keys hot
    with a cap of 50; the pairs still join every copy into one component."""
    from dedup.lsh import components

    rnd = random.Random(3)
    centre = rnd.getrandbits(64)
    copies = sorted({_flip(rnd, centre, rnd.randint(0, 2)) for _ in range(3000)})
    noise = [rnd.getrandbits(64) for _ in range(2000)]
    con = _con(copies + noise)
    st: dict = {}
    near_pairs(con, "t", None, 4, 0, "pairs", max_bucket=50, stats=st)
    e = con.execute("SELECT a, b FROM pairs WHERE b < $n", {"n": len(copies)}).fetchnumpy()
    nodes, roots = components(e["a"], e["b"])
    assert st["hot_buckets"] > 0
    assert len(nodes) == len(copies) and len(set(roots.tolist())) == 1


def test_two_sided_join_caps_only_buckets_hot_on_both_sides():
    """Decontamination's join (training rows vs eval images): a key hot on the training side
    only is not capped; hot on both sides, it is, and pairs sharing other keys still meet."""
    rnd = random.Random(5)
    _, shift, mask = band_layout(5)[0]
    same = [(rnd.getrandbits(64) & ~(mask << shift)) | (0x155 << shift) for _ in range(1500)]
    small = [_flip(rnd, h, rnd.randint(0, 4)) for h in same[:40]]
    con = duckdb.connect()
    for name, rows in (("l", same), ("r_small", small), ("r_big", same[:300])):
        con.register(name, pa.table({"id": np.arange(len(rows)),
                                     "h": pa.array(rows, pa.uint64())}))
    st: dict = {}
    near_pairs(con, "l", "r_small", 4, 5, "p1", max_bucket=100, stats=st)
    got = {(a, b) for a, b in con.execute("SELECT a, b FROM p1").fetchall()}
    truth = {(i, j) for i, a in enumerate(same) for j, b in enumerate(small)
             if hamming(a, b) <= 4}
    assert st["hot_buckets"] == 0 and got == truth and len(truth) >= 40
    st = {}
    near_pairs(con, "l", "r_big", 4, 5, "p2", max_bucket=100, stats=st, count_candidates=True)
    assert st["hot_buckets"] == 1 and st["largest_hot_bucket"] == 1500
    # capped: each side's rows meet the other's 100 representatives (1500x300 uncapped)
    assert st["candidates"] <= 100 * 1500 + 100 * 300 + 20_000
    got = {(a, b) for a, b in con.execute("SELECT a, b FROM p2").fetchall()}
    assert {(i, i) for i in range(300)} <= got  # equal hashes share every other table too
