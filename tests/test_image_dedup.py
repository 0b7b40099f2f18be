"""Image dedup on real files: sha256 exact copies, pHash near copies, LSH recall, clusters."""

from __future__ import annotations

import random

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import scipy.fftpack
from PIL import Image

from dedup.lsh import band_layout, components, default_bands, near_pairs
from dedup.phash import hamming, phash_bytes, phash_image
from pipeline.stage import run_stage
from tests.curation_fixtures import crawl_run, drawn_image, jpeg, make_build, png, read_parquet


def imagehash_phash(img: Image.Image) -> int:
    """imagehash.phash (hash_size 8, highfreq_factor 4), written out with scipy's DCT."""
    pixels = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS))
    dct = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)
    low = dct[:8, :8]
    bits = "".join(str(int(b)) for b in (low > np.median(low)).flatten())
    return int(bits, 2)


def test_phash_matches_imagehash_algorithm():
    for seed in range(25):
        img = drawn_image(seed, size=97 + seed)
        assert phash_image(img) == imagehash_phash(img), seed


def test_phash_near_for_reencoded_and_resized_far_for_others():
    base = drawn_image(7, size=256)
    h = phash_bytes(jpeg(base, 95))
    assert hamming(h, phash_bytes(jpeg(base, 30))) <= 4
    assert hamming(h, phash_bytes(jpeg(base.resize((120, 120)), 70))) <= 4
    assert hamming(h, phash_bytes(png(base))) <= 2
    others = [phash_bytes(jpeg(drawn_image(100 + i, 256))) for i in range(20)]
    assert min(hamming(h, o) for o in others) > 8


def _brute(hashes: list[int], k: int) -> set[tuple[int, int]]:
    return {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
            if hamming(hashes[i], hashes[j]) <= k}


@pytest.mark.parametrize("k", [0, 3, 6])
def test_lsh_join_finds_exactly_the_brute_force_pairs(k):
    rnd = random.Random(k)
    hashes = [rnd.getrandbits(64) for _ in range(300)]
    for i in range(300):  # plant neighbours at every distance up to k + 2
        flips = rnd.sample(range(64), rnd.randint(0, k + 2))
        hashes.append(hashes[i] ^ sum(1 << b for b in flips))
    con = duckdb.connect()
    con.register("t", pa.table({"id": list(range(len(hashes))),
                                "h": pa.array(hashes, pa.uint64())}))
    near_pairs(con, "t", None, k, default_bands(k), "pairs")
    got = {(a, b) for a, b in con.execute("SELECT a, b FROM pairs").fetchall()}
    assert got == _brute(hashes, k)
    assert len(got) >= 50  # many planted pairs are within k


def test_band_layout_covers_all_64_bits_once():
    for bands in (1, 5, 7, 64):
        mask = 0
        for _, shift, m in band_layout(bands):
            assert mask & (m << shift) == 0
            mask |= m << shift
        assert mask == (1 << 64) - 1


def test_components_are_order_independent_and_keep_smallest():
    a, b = np.array([5, 2, 9, 7]), np.array([2, 9, 11, 8])
    nodes, roots = components(a, b)
    got = dict(zip(nodes.tolist(), roots.tolist(), strict=True))
    assert got == {2: 2, 5: 2, 9: 2, 11: 2, 7: 7, 8: 7}
    n2, r2 = components(b[::-1], a[::-1])
    assert n2.tolist() == nodes.tolist() and r2.tolist() == roots.tolist()


def test_image_dedup_stage(tmp_path):
    cfg = make_build(tmp_path, "image_dedup:\n  phash_max_distance: 4\n")
    base, other = drawn_image(1, 256), drawn_image(2, 256)
    original = jpeg(base, 90)
    samples = [
        ("u10", "a drawing", original),
        ("u05", "same bytes, another url", original),  # exact copy, smaller uid
        ("u20", "recompressed", jpeg(base, 35)),
        ("u30", "resized", jpeg(base.resize((100, 100)), 80)),
        ("u40", "other picture", jpeg(other, 90)),
        ("u41", "other picture, png", png(other)),
        ("u50", "broken bytes", b"\xff\xd8 not really a jpeg"),
        ("u60", "lost image", None),
    ] + [(f"u7{i}", f"distinct {i}", jpeg(drawn_image(300 + i, 200), 85)) for i in range(6)]
    crawl_run(cfg, samples, upstream="image_filter", per_tar=3)
    report = run_stage(cfg, "image_dedup", log=lambda s: None)

    folder = cfg.run_dir / "08_image_dedup"
    kept = {r["uid"]: r for r in read_parquet(folder / "kept.parquet")}
    dropped = {r["uid"]: r for r in read_parquet(folder / "dropped.parquet")}
    assert report["rows_in"] == len(samples) == len(kept) + len(dropped)
    assert not set(kept) & set(dropped)
    assert dropped["u10"]["reason"] == "duplicate_image_sha256"
    assert dropped["u10"]["detail"] == "u05"
    for uid in ("u20", "u30"):
        assert (dropped[uid]["reason"], dropped[uid]["detail"]) == ("near_duplicate_image", "u05")
    assert (dropped["u41"]["reason"], dropped["u41"]["detail"]) == ("near_duplicate_image", "u40")
    assert dropped["u50"]["reason"] == "unreadable_image"
    assert dropped["u60"]["reason"] == "unreadable_image"
    assert "no image member" in dropped["u60"]["detail"]
    assert set(kept) == {"u05", "u40"} | {f"u7{i}" for i in range(6)}
    # carried columns + the pHash of the exact bytes in the tar
    assert kept["u05"]["phash"] == phash_bytes(original)
    assert kept["u05"]["caption"] == "same bytes, another url" and kept["u05"]["tar"]
    assert report["dropped_by_reason"] == {"near_duplicate_image": 3, "unreadable_image": 2,
                                           "duplicate_image_sha256": 1}
    assert report["lsh_bands"] == 5 and report["lsh_recall_complete"]

    # a rerun with nothing changed is skipped; a forced rerun reuses the pHash cache
    assert run_stage(cfg, "image_dedup", log=lambda s: None).get("skipped")
    again = run_stage(cfg, "image_dedup", force=True, log=lambda s: None)
    assert again["dropped_by_reason"] == report["dropped_by_reason"]


def test_image_dedup_exact_only(tmp_path):
    cfg = make_build(tmp_path, "image_dedup:\n  phash: false\n")
    base = drawn_image(1, 128)
    samples = [("b", "x", jpeg(base, 90)), ("a", "y", jpeg(base, 90)),
               ("c", "recompressed survives without pHash", jpeg(base, 40))]
    crawl_run(cfg, samples, upstream="image_filter")
    run_stage(cfg, "image_dedup", log=lambda s: None)
    folder = cfg.run_dir / "08_image_dedup"
    kept = read_parquet(folder / "kept.parquet")
    assert sorted(r["uid"] for r in kept) == ["a", "c"]
    assert "phash" not in kept[0]
    assert read_parquet(folder / "dropped.parquet") == [
        {"uid": "b", "stage": "image_dedup", "reason": "duplicate_image_sha256", "detail": "a"}]


def test_phash_of_unreadable_bytes_raises_cleanly():
    with pytest.raises(OSError):
        phash_bytes(b"garbage")
    assert isinstance(phash_bytes(jpeg(Image.new("RGB", (8, 8)))), int)
