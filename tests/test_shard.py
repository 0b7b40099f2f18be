"""Shard stage on real files: WebDataset tars read back by webdataset and GNU tar,
byte-identical reruns, seed-driven order, upsampling, sizes.json, index and conservation."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess

import pyarrow.parquet as pq
import webdataset as wds

from pipeline.stage import run_stage
from tests.curation_fixtures import (
    crawl_run,
    drawn_image,
    jpeg,
    make_build,
    mark_done,
    read_parquet,
)


def _samples(n: int, seed: int = 0) -> list[tuple[str, str, bytes | None]]:
    return [(hashlib.md5(f"{seed}-{i}".encode()).hexdigest(), f"caption {i} naïve café",
             jpeg(drawn_image(1000 + i, 48), 80)) for i in range(n)]


def _build(tmp_path, shard_yaml: str, samples):
    cfg = make_build(tmp_path, f"shard:\n{shard_yaml}")
    rows = crawl_run(cfg, samples, upstream="image_dedup", per_tar=6)
    return cfg, rows


def _tars(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def test_shards_read_back_and_are_deterministic(tmp_path):
    samples = _samples(23)
    cfg, rows = _build(tmp_path / "a", "  samples_per_shard: 5\n  seed: 7\n", samples)
    report = run_stage(cfg, "shard", log=lambda s: None)
    out = cfg.run_dir / "14_shard"
    tars = _tars(out)
    assert list(tars) == [f"shard-00000{i}.tar" for i in range(5)]
    assert json.loads((out / "sizes.json").read_text()) == {
        f"shard-00000{i}.tar": (5 if i < 4 else 3) for i in range(5)}
    assert report["samples_written"] == 23 and report["shards"] == 5

    # webdataset reads every sample back with the crawled bytes, caption and metadata
    by_uid = {u: (c, d) for u, c, d in samples}
    got = list(wds.WebDataset([str(out / n) for n in tars], shardshuffle=False))
    assert sorted(s["__key__"] for s in got) == sorted(by_uid)
    for s in got:
        caption, data = by_uid[s["__key__"]]
        assert s["jpg"] == data and s["txt"].decode() == caption
        meta = json.loads(s["json"])
        assert meta["uid"] == s["__key__"] and meta["url"].endswith(f"{meta['uid']}.jpg")
        assert "tar" not in meta and meta["sha256"] == hashlib.sha256(data).hexdigest()
    # the global order is a seeded shuffle, not the input order
    assert [s["__key__"] for s in got] != [u for u, _, _ in samples]

    # plain tar lists the same members, in the same order as the index
    listing = subprocess.run(["tar", "-tf", str(out / "shard-000000.tar")], check=True,
                             capture_output=True, text=True).stdout.split()
    index = read_parquet(out / "index.parquet")
    first = [r for r in index if r["shard"] == "shard-000000.tar"]
    assert listing == [f"{r['key']}.{ext}" for r in first for ext in ("jpg", "json", "txt")]
    assert [r["member"] for r in first] == [f"{r['key']}.jpg" for r in first]
    verbose = subprocess.run(["tar", "-tvf", str(out / "shard-000001.tar")], check=True,
                             capture_output=True, text=True).stdout
    assert "1970-01-01" in verbose and "-r--r--r--" in verbose
    for r in read_parquet(out / "shards.parquet"):
        assert r["sha256"] == hashlib.sha256(tars[r["shard"]]).hexdigest()
        assert r["bytes"] == len(tars[r["shard"]])

    # a forced rerun, and another build with the input rows in another order: same bytes
    run_stage(cfg, "shard", force=True, log=lambda s: None)
    assert _tars(out) == tars
    cfg_b, _ = _build(tmp_path / "b", "  samples_per_shard: 5\n  seed: 7\n", samples)
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    mark_done(cfg_b, "image_dedup", shuffled)
    run_stage(cfg_b, "shard", log=lambda s: None)
    assert _tars(cfg_b.run_dir / "14_shard") == tars
    # another seed: another order
    cfg_c, _ = _build(tmp_path / "c", "  samples_per_shard: 5\n  seed: 8\n", samples)
    run_stage(cfg_c, "shard", log=lambda s: None)
    assert _tars(cfg_c.run_dir / "14_shard") != tars


def test_upsampling_and_conservation(tmp_path):
    samples = _samples(7, seed=1) + [("f" * 32, "image lost from the tar", None)]
    cfg, _ = _build(tmp_path, "  samples_per_shard: 4\n  upsample: 3\n", samples)
    report = run_stage(cfg, "shard", log=lambda s: None)
    out = cfg.run_dir / "14_shard"
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == 21 and len(sizes) == 6 and sizes["shard-000005.tar"] == 1
    keys = [s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")),
                                                  shardshuffle=False)]
    assert sorted(keys) == sorted(f"{u}_{c}" for u, _, d in samples if d for c in (1, 2, 3))
    kept = read_parquet(out / "kept.parquet")
    assert sorted(r["uid"] for r in kept) == sorted(u for u, _, d in samples if d)
    assert {r["copies"] for r in kept} == {3} and "caption" in kept[0]
    dropped = read_parquet(out / "dropped.parquet")
    assert [(d["uid"], d["reason"]) for d in dropped] == [("f" * 32, "unreadable_image")]
    assert report["rows_in"] == len(kept) + len(dropped) == 8
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert len(index) == 21 and {r["copy"] for r in index} == {1, 2, 3}


def test_empty_input_writes_no_shards(tmp_path):
    cfg, rows = _build(tmp_path, "  samples_per_shard: 4\n", _samples(2))
    mark_done(cfg, "image_dedup", [], template=rows[0])
    report = run_stage(cfg, "shard", log=lambda s: None)
    out = cfg.run_dir / "14_shard"
    assert report["shards"] == 0 and report["kept"] == 0 and report["dropped"] == 0
    assert json.loads((out / "sizes.json").read_text()) == {}
    assert not list(out.glob("*.tar"))


def test_fast_ustar_header_equals_tarfile():
    import tarfile

    from pipeline.shard import ustar_header

    for name, size in [("a.jpg", 0), (f"{'ab' * 16}_12.json", 123456), ("x" * 100, 5),
                       ("d" * 120 + "/y.txt", 77), ("é.txt", 8**11 - 1)]:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = (
            size, 0, 0o444, 0, 0, "", "")
        assert ustar_header(name, size) == ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def test_fast_tar_index_equals_tarfile(tmp_path):
    import tarfile

    from dedup.imagestore import _scan_images_numpy, index_tar
    from tests.curation_fixtures import write_tar

    plain, long = tmp_path / "plain.tar", tmp_path / "long.tar"
    members = [(f"{i:05d}.jpg", jpeg(drawn_image(i, 32))) for i in range(5)]
    write_tar(plain, members + [("00001.txt", b"caption"), ("sub/00009.png", b"\x89PNG")])
    write_tar(long, members + [("z" * 150 + ".jpg", b"data")])  # needs a pax record
    assert _scan_images_numpy(plain) is not None
    assert _scan_images_numpy(long) is None  # falls back to tarfile
    for path in (plain, long):
        with tarfile.open(path) as tf:
            ref = {m.name: (m.offset_data, m.size) for m in tf if m.isfile()}
        got = index_tar(path)
        assert {f"{m.key}.{m.ext}": (m.offset, m.size) for m in got.values()} == {
            k: v for k, v in ref.items() if not k.endswith(".txt")}


def test_worker_threads_write_the_same_bytes(tmp_path):
    samples = _samples(11, seed=2)
    one, _ = _build(tmp_path / "one", "  samples_per_shard: 3\n  workers: 1\n", samples)
    two, _ = _build(tmp_path / "two", "  samples_per_shard: 3\n  workers: 2\n", samples)
    assert run_stage(one, "shard", log=lambda s: None)["workers"] == 1
    assert run_stage(two, "shard", log=lambda s: None)["workers"] == 2
    assert _tars(one.run_dir / "14_shard") == _tars(two.run_dir / "14_shard")
    assert (read_parquet(one.run_dir / "14_shard" / "index.parquet")
            == read_parquet(two.run_dir / "14_shard" / "index.parquet"))


def test_bulk_tar_headers_equal_tarfile():
    import tarfile

    import numpy as np
    import pyarrow as pa

    from pipeline.shard import tar_headers

    names = ["a.jpg", f"{'ab' * 16}_12.json", "x" * 100, "d" * 120 + "/y.txt", "é.txt",
             "naïve/ключ.txt", "k.json"]
    sizes = np.array([0, 123456, 5, 77, 8**11 - 1, 511, 512], np.int64)
    got = tar_headers(pa.array(names, pa.string()), sizes)
    for row, name, size in zip(got, names, sizes.tolist(), strict=True):
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = (
            size, 0, 0o444, 0, 0, "", "")
        assert row.tobytes() == ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"), name


def test_numpy_tar_scan_follows_webdataset_naming(tmp_path):
    import tarfile

    from dedup.imagestore import _scan_images_numpy, scan_images, split_name
    from tests.curation_fixtures import write_tar

    img = jpeg(drawn_image(3, 32))
    members = [("00001.jpg", img), ("00001.txt", b"cap"), ("00002.JPG", img[:100]),
               ("sub/dir/00003.png", b"\x89PNG" * 300), ("00004.seg.jpg", b"not an image"),
               ("00005.webp", b""), ("00005.jpg", b"second image, same key"),
               ("noext", b"x"), ("00006.jpeg", img[:7])]
    plain = tmp_path / "plain.tar"
    write_tar(plain, members)
    with tarfile.open(plain, "a") as tf:  # a directory entry is skipped
        ti = tarfile.TarInfo("sub")
        ti.type = tarfile.DIRTYPE
        tf.addfile(ti)
    with tarfile.open(plain) as tf:
        ref: dict[str, tuple[str, int, int]] = {}
        for m in tf:
            key, ext = split_name(m.name)
            if m.isfile() and ext.lower() in ("jpg", "jpeg", "png", "webp") and key not in ref:
                ref[key] = (ext, m.offset_data, m.size)
    fast = _scan_images_numpy(plain)
    assert fast is not None  # ASCII names, no prefixes: the numpy path
    got = dict(zip(fast.keys(), zip(fast.exts(), fast.offsets.tolist(), fast.sizes.tolist(),
                                    strict=True), strict=True))
    assert got == ref and list(got) == list(ref)
    assert got["00005"] == ("webp", ref["00005"][1], 0)
    # a non-ASCII name takes the Python path, with the same answer for the same members
    other = tmp_path / "other.tar"
    write_tar(other, members + [("café.jpg", img)])
    assert _scan_images_numpy(other) is None
    slow = scan_images(other)
    assert slow.keys() == [*ref, "café"] and slow.exts()[-1] == "jpg"
    empty = tmp_path / "empty.tar"
    write_tar(empty, [])
    assert scan_images(empty).keys() == [] and len(scan_images(empty).sizes) == 0


def test_many_crawl_tars_raise_the_open_file_limit_or_fail_clearly(tmp_path):
    # a fresh interpreter: the test lowers its limits, which cannot always be raised back
    import subprocess
    import sys

    for i in range(100):
        (tmp_path / f"{i}.tar").write_bytes(b"")
    code = f"""
import resource, sys
from pathlib import Path
from pipeline.shard import _open_all
from pipeline.stage import StageError
paths = sorted(str(p) for p in Path({str(tmp_path)!r}).glob("*.tar"))
hard = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))
try:
    fds = _open_all(paths)
except StageError as e:
    print("error", e)
else:
    print("ok", len(fds), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""
    run = lambda hard: subprocess.run([sys.executable, "-c", code, str(hard)],  # noqa: E731
                                      capture_output=True, text=True, check=True).stdout
    assert run(1000).split() == ["ok", "100", "356"]  # soft limit raised to what it needs
    out = run(300)
    assert out.startswith("error") and "100 crawl tars" in out and "ulimit -Hn" in out
