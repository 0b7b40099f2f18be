"""Stage shard: the kept samples as WebDataset tars, sizes.json and a shard index.

Output, inside the stage folder (so the runner's atomic rename covers it):

* ``shard-000000.tar`` … — members ``<key>.jpg`` (the crawled bytes, unchanged; the extension
  is the crawl's format), ``<key>.txt`` (caption, UTF-8) and ``<key>.json`` (every metadata
  column, sorted keys; ``phash`` as 16 hex digits). ``shard.samples_per_shard`` per tar.
* Order: a global shuffle by md5(uid, copy, seed), not a global RNG, so the tars depend only on
  the rows and the seed. With ``shard.upsample`` k > 1 every uid is written k times, keys
  ``<uid>_1`` … ``<uid>_k`` (each copy lands at its own place in the shuffle).
* Byte-identical tars for the same inputs and seed: ustar headers with mtime 0, uid/gid 0, no
  user/group names, mode 0444, laid out by :func:`_write_shard` (tarfile's header encoder, no
  clock, no PAX records).
* ``sizes.json`` as open_clip reads it ({tar name: samples}), ``index.parquet`` (uid, key,
  copy, shard, member, position) and ``shards.parquet`` (shard, samples, bytes, sha256).

kept.parquet = the input rows that were written, plus ``copies``. A row whose image member is
missing from its crawl tar is dropped as ``unreadable_image``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from dedup.imagestore import KEY_COL, TAR_COL, scan_images
from pipeline.progress import progress
from pipeline.stage import StageContext, StageError

_PLAN_SQL = (Path(__file__).parent / "sql" / "shard_plan.sql").read_text()
_BLOCK = 512
_RECORD = 20 * _BLOCK  # GNU tar and tarfile pad archives to 10 KiB records
_NOT_META = {TAR_COL, KEY_COL}
_CHUNK = 1 << 20


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


_HEAD = b"0000444\0" + b"0000000\0" * 2  # mode 0444, uid 0, gid 0
_MTIME = b"00000000000\0"
# type file, no link name, ustar magic, no user/group names, no device numbers, no prefix
_TAIL = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * 64 + b"\0" * 16 + b"\0" * 167
# the checksum counts every header byte, the checksum field itself as 8 spaces: only the name
# and size fields vary, so the rest is summed once
_CHK_CONST = sum(_HEAD) + sum(_MTIME) + sum(_TAIL) + 8 * 32


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header tarfile writes for a file with mtime 0, uid/gid 0, no user
    or group names and mode 0444 (same bytes as ``TarInfo.tobuf(USTAR_FORMAT)``, ~15× faster).
    """
    raw = name.encode("utf-8")
    if len(raw) > 100 or size >= 8**11:
        ti = tarfile.TarInfo(name)  # long names go into the prefix field: tarfile knows how
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = (
            size, 0, 0o444, 0, 0, "", "")
        return ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
    octal = b"%011o\0" % size
    chksum = sum(raw) + sum(octal) + _CHK_CONST
    return b"".join((raw.ljust(100, b"\0"), _HEAD, octal, _MTIME, b"%06o\0 " % chksum, _TAIL))


def _tar_header_template() -> np.ndarray:
    """ustar_header's bytes with an empty name, size 0 and the checksum field as 8 spaces."""
    t = np.frombuffer(ustar_header("x", 0), np.uint8).copy()
    t[0] = 0
    t[148:156] = 32
    return t


_TEMPLATE = _tar_header_template()
_SIZE_SHIFTS = np.arange(30, -1, -3, dtype=np.int64)  # 11 octal digits, most significant first
_CHK_SHIFTS = np.arange(15, -1, -3, dtype=np.int64)  # 6 digits


def _strings(col: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(UTF-8 data, start offsets, lengths) of an Arrow string column, without copying."""
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.large_string())  # e.g. string_view from a newer DuckDB
    bufs = col.buffers()
    wide = pa.types.is_large_string(col.type)
    offsets = np.frombuffer(bufs[1], np.int64 if wide else np.int32)[
        col.offset:col.offset + len(col) + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return data, offsets[:-1], np.diff(offsets)


def _ints(col: pa.Array) -> np.ndarray:
    """An Arrow integer column without nulls as int64 numpy (a view: Array.to_numpy would
    import pandas, ~0.5 s)."""
    if col.type != pa.int64():
        col = col.cast(pa.int64())
    return np.frombuffer(col.buffers()[1], np.int64)[col.offset:col.offset + len(col)]


def _scatter(dst: np.ndarray, dst_starts: np.ndarray, col: pa.Array,
             keep: np.ndarray | None = None) -> None:
    """Copy string i of ``col`` (for each i where ``keep``) to ``dst[dst_starts[i]:]``, all
    strings in one numpy step."""
    data, starts, lens = _strings(col)
    if keep is not None:
        lens = np.where(keep, lens, 0)
    total = int(lens.sum())
    if not total:
        return
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
    dst[np.repeat(dst_starts, lens) + within] = data[np.repeat(starts, lens) + within]


def tar_headers(names: pa.Array, sizes: np.ndarray) -> np.ndarray:
    """ustar_header(names[i], sizes[i]) for every i as rows of a (n, 512) array, computed with
    numpy (byte-equal to tarfile's encoder; names over 100 bytes go through ustar_header)."""
    n = len(sizes)
    h = np.tile(_TEMPLATE, (n, 1))
    _, _, lens = _strings(names)
    odd = (lens > 100) | (sizes >= 8**11)
    _scatter(h.reshape(-1), np.arange(n, dtype=np.int64) * _BLOCK, names, ~odd)
    h[:, 124:135] = 48 + ((sizes[:, None] >> _SIZE_SHIFTS) & 7)
    chk = h.sum(axis=1, dtype=np.int64)
    h[:, 148:154] = 48 + ((chk[:, None] >> _CHK_SHIFTS) & 7)
    h[:, 154] = 0
    h[:, 155] = 32
    for i in np.flatnonzero(odd).tolist():
        h[i] = np.frombuffer(ustar_header(names[i].as_py(), int(sizes[i])), np.uint8)
    return h


def _blocks(n: np.ndarray) -> np.ndarray:
    return (n + _BLOCK - 1) // _BLOCK


_LOCAL = threading.local()


def _buffer(size: int) -> np.ndarray:
    """A zeroed buffer of ``size`` bytes, reused by the calling thread from shard to shard (a
    fresh 14 MB array costs a page fault per 4 KiB page: more than clearing a warm one)."""
    buf = getattr(_LOCAL, "buf", None)
    if buf is None or len(buf) < size:
        buf = _LOCAL.buf = np.zeros(size, np.uint8)
        return buf
    view = buf[:size]
    view[:] = 0
    return view


def _write_shard(job: tuple[Path, str, pa.Table, list[int]]) -> tuple[str, int, int, str]:
    """Write one shard; returns (name, samples, bytes, sha256).

    The whole tar is laid out in one zeroed numpy buffer: the headers of all members are built
    at once (tar_headers), json and txt bytes are scattered into place straight from the
    Arrow columns, and each image is read from its crawl tar into its slot with one preadv.
    Then one hash and one write. Only the preadv loop is per sample in Python; numpy, reads,
    hashing and the write release the GIL, so threads writing different shards overlap.
    """
    out_dir, name, t, fds = job
    n = t.num_rows
    col = {c: t.column(c).combine_chunks() for c in t.column_names}
    sizes = _ints(col["size"])
    js_len = _strings(col["js"])[2]
    txt_len = _strings(col["txt"])[2]
    ci, cj, ct = _blocks(sizes), _blocks(js_len), _blocks(txt_len)
    per = 3 + ci + cj + ct
    hdr_img = np.cumsum(per) - per  # block of each sample's first header
    hdr_js = hdr_img + 1 + ci
    hdr_txt = hdr_js + 1 + cj
    nblocks = int(per.sum()) + 2  # two zero blocks end the archive
    total = nblocks * _BLOCK
    total += -total % _RECORD
    buf = _buffer(total)
    blocks = buf.reshape(-1, _BLOCK)
    blocks[hdr_img] = tar_headers(col["img_name"], sizes)
    blocks[hdr_js] = tar_headers(col["js_name"], js_len)
    blocks[hdr_txt] = tar_headers(col["txt_name"], txt_len)
    _scatter(buf, (hdr_js + 1) * _BLOCK, col["js"])
    _scatter(buf, (hdr_txt + 1) * _BLOCK, col["txt"])
    view = memoryview(buf)
    for tar_id, start, size, offset in zip(_ints(col["tar_id"]).tolist(),
                                           ((hdr_img + 1) * _BLOCK).tolist(), sizes.tolist(),
                                           _ints(col["offset"]).tolist(), strict=True):
        got = os.preadv(fds[tar_id], [view[start:start + size]], offset) if size else 0
        if got != size:
            raise StageError(f"shard: crawl tar #{tar_id}: short read at offset {offset} "
                             f"({got} of {size} bytes)")
    # hashed and written 1 MiB at a time: each piece is hashed while it sits in the CPU cache
    # and copied to the page cache from there (one 14 MB write measured 1-5x slower here)
    sha = hashlib.sha256()
    fd = os.open(out_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        for start in range(0, total, _CHUNK):
            piece = view[start:min(start + _CHUNK, total)]
            sha.update(piece)
            done = 0
            while done < len(piece):
                done += os.write(fd, piece[done:])
    finally:
        os.close(fd)
    return name, n, total, sha.hexdigest()


def _arrow_strings(parts: list[tuple[np.ndarray, np.ndarray]]) -> pa.Array:
    """One Arrow string column from (bytes, offsets) pieces (no pa.array: it imports pandas)."""
    data = np.concatenate([d for d, _ in parts]) if parts else np.zeros(0, np.uint8)
    base = np.cumsum([0] + [int(o[-1]) for _, o in parts])
    offsets = np.concatenate([np.zeros(1, np.int64)] + [o[1:] + b for (_, o), b in
                                                          zip(parts, base[:-1], strict=True)])
    return pa.Array.from_buffers(pa.large_string(), len(offsets) - 1,
                                 [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _arrow_ints(parts: list[np.ndarray]) -> pa.Array:
    values = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def _index_members(con: Any, run_dir: Path) -> list[str]:
    """Scan the crawl tars named in src into temp tables tars(tar_id, tar) and
    members(tar_id, key, ext, offset, size); returns the tars' paths by tar_id."""
    tars = [r[0] for r in con.execute(
        f"SELECT DISTINCT {TAR_COL} FROM src WHERE {TAR_COL} IS NOT NULL ORDER BY 1").fetchall()]
    found = []
    for tar in progress(tars, desc="index crawl tars", unit="tar", leave=False):
        try:
            found.append(scan_images(run_dir / tar))
        except ValueError as e:
            raise StageError(f"shard: crawl tar {run_dir / tar}: {e}") from e
    members = pa.Table.from_arrays([
        _arrow_ints([np.full(len(f.sizes), i, np.int64) for i, f in enumerate(found)]),
        _arrow_strings([(f.key_data, f.key_offsets) for f in found]),
        _arrow_strings([(f.ext_data, f.ext_offsets) for f in found]),
        _arrow_ints([f.offsets for f in found]), _arrow_ints([f.sizes for f in found]),
    ], names=["tar_id", "key", "ext", "offset", "size"])
    con.register("members_arrow", members)
    con.execute("CREATE TEMP TABLE members AS SELECT * FROM members_arrow")
    con.unregister("members_arrow")
    con.execute("CREATE TEMP TABLE tars AS SELECT unnest($1::VARCHAR[]) AS tar, "
                "unnest(range(len($1)))::BIGINT AS tar_id", [tars])
    return [str(run_dir / t) for t in tars]


def _open_all(paths: list[str]) -> list[int]:
    """One read-only descriptor per crawl tar, held for the whole stage (shards draw from any
    tar in shuffled order). A crawl of many tars can pass the usual soft limit of 1024 open
    files: raise it up to the hard limit, and say so when even that is too few."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = len(paths) + 256  # parquet, DuckDB and the output shards besides
    if need > soft:
        if hard != resource.RLIM_INFINITY and need > hard:
            raise StageError(f"shard: {len(paths)} crawl tars to read but at most {hard} open "
                             "files allowed (ulimit -Hn); raise the limit or crawl into fewer, "
                             "larger tars (crawl.number_sample_per_shard)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return [os.open(p, os.O_RDONLY) for p in paths]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _json_sql(meta_cols: list[str]) -> str:
    """json_object of every metadata column plus the sample key, keys sorted."""
    parts = []
    for c in sorted([*meta_cols, "key"]):
        value = ("p.sample_key" if c == "key" else
                 "CASE WHEN s.phash IS NULL THEN NULL ELSE printf('%016x', s.phash) END"
                 if c == "phash" else f"s.{_quote(c)}")
        parts.append("'" + c.replace("'", "''") + "', " + value)
    return "json_object(" + ", ".join(parts) + ")::VARCHAR"


def _shard_tables(reader: pa.RecordBatchReader, per: int) -> Iterator[pa.Table]:
    """Exactly ``per`` rows at a time out of the plan's record batches."""
    pending: list[pa.RecordBatch] = []
    rows = 0
    for batch in reader:
        pending.append(batch)
        rows += batch.num_rows
        while rows >= per:
            t = pa.Table.from_batches(pending)
            yield t.slice(0, per)
            rest = t.slice(per)
            pending, rows = rest.to_batches(), rest.num_rows
    if rows:
        yield pa.Table.from_batches(pending)


def run(ctx: StageContext) -> dict[str, Any]:
    s = ctx.cfg.shard
    con = ctx.connect()
    con.execute(f"CREATE TEMP TABLE src AS SELECT * FROM read_parquet('{ctx.input_path}')")
    cols = [r[0] for r in con.execute("DESCRIBE src").fetchall()]
    for c in ("uid", "caption", TAR_COL, KEY_COL):
        if c not in cols:
            raise StageError(f"shard: {ctx.input_path} has no {c!r} column (the crawl's "
                             f"tar/key locate each image)")
    meta_cols = [c for c in cols if c not in _NOT_META]
    started = time.time()
    paths = _index_members(con, ctx.cfg.run_dir)
    con.execute(_PLAN_SQL, {"copies": s.upsample, "seed": s.seed})
    total = con.execute("SELECT count(*) FROM shard_plan").fetchall()[0][0]
    shards: dict[str, list] = {"shard": [], "samples": [], "bytes": [], "sha256": []}
    fds = _open_all(paths)
    try:
        # one query for the whole plan, streamed as Arrow columns: metadata JSON and member
        # names are built by DuckDB, not per sample in Python
        reader = con.sql(
            "SELECT p.tar_id, p.\"offset\", p.size, p.sample_key || '.' || p.ext AS img_name, "
            "p.sample_key || '.json' AS js_name, p.sample_key || '.txt' AS txt_name, "
            f"{_json_sql(meta_cols)} AS js, coalesce(s.caption, '') AS txt "
            "FROM shard_plan p JOIN src s USING (uid) ORDER BY p.pos"
        ).to_arrow_reader(s.samples_per_shard)
        jobs = ((ctx.out_dir, shard_name(i), t, fds)
                for i, t in enumerate(_shard_tables(reader, s.samples_per_shard)))
        bar = progress(total=total, desc="shard", unit="sample", leave=False)
        # shards are independent: worker threads write them side by side (the heavy parts,
        # numpy layout, reads, hashing and writing big buffers, release the GIL); at most
        # two shards per thread are in memory at a time
        parallel = s.workers > 1 and total > s.samples_per_shard
        workers = s.workers if parallel else 1
        with ThreadPoolExecutor(workers) as pool:
            running: deque[Future] = deque()
            for job in jobs:
                running.append(pool.submit(_write_shard, job))
                while len(running) >= 2 * workers or (running and running[0].done()):
                    _collect(running.popleft().result(), shards, bar)
            while running:
                _collect(running.popleft().result(), shards, bar)
        bar.close()
    finally:
        for fd in fds:
            os.close(fd)
    seconds = time.time() - started

    n = int(s.samples_per_shard)
    con.execute(f"""COPY (
        SELECT uid, sample_key AS key, copy::INTEGER AS copy,
               printf('shard-%06d.tar', pos // {n}) AS shard, sample_key || '.' || ext AS member,
               (pos % {n})::INTEGER AS position
        FROM shard_plan ORDER BY pos) TO '{ctx.out_dir / "index.parquet"}' (FORMAT parquet)""")
    con.execute(f"COPY (SELECT unnest($1::VARCHAR[]) AS shard, unnest($2::BIGINT[]) AS samples, "
                f"unnest($3::BIGINT[]) AS bytes, unnest($4::VARCHAR[]) AS sha256) "
                f"TO '{ctx.out_dir / 'shards.parquet'}' (FORMAT parquet)",
                [shards[k] for k in ("shard", "samples", "bytes", "sha256")])
    sizes = dict(zip(shards["shard"], shards["samples"], strict=True))
    (ctx.out_dir / "sizes.json").write_text(json.dumps(sizes, indent=1))

    con.execute(f"COPY (SELECT *, {int(s.upsample)}::INTEGER AS copies FROM src "
                f"WHERE uid IN (SELECT uid FROM shard_plan) ORDER BY uid) "
                f"TO '{ctx.kept_path}' (FORMAT parquet)")
    con.execute(f"""COPY (
        SELECT s.uid, '{ctx.spec.name}' AS stage, 'unreadable_image' AS reason,
               'no image member ' || coalesce(s.{KEY_COL}, 'NULL') || ' in '
               || coalesce(s.{TAR_COL}, 'NULL') AS detail
        FROM src s ANTI JOIN (SELECT t.tar, m.key FROM members m JOIN tars t USING (tar_id)) m
            ON m.tar = s.{TAR_COL} AND m.key = s.{KEY_COL}
        ORDER BY s.uid) TO '{ctx.dropped_path}' (FORMAT parquet)""")
    con.close()
    written = sum(shards["bytes"])
    return {
        "shards": len(shards["shard"]), "samples_written": total, "upsample": s.upsample,
        "seed": s.seed, "bytes_written": written, "source_tars": len(paths),
        "shard_seconds": round(seconds, 3), "workers": workers,
        "mb_per_s": round(written / 1e6 / seconds, 1) if seconds > 0 else None,
    }


def _collect(result: tuple[str, int, int, str], shards: dict[str, list], bar: tqdm) -> None:
    for k, v in zip(("shard", "samples", "bytes", "sha256"), result, strict=True):
        shards[k].append(v)
    bar.update(result[1])
