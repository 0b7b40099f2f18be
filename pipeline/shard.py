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
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from dedup.imagestore import KEY_COL, TAR_COL, ImageStore
from pipeline.stage import StageContext, StageError

_PLAN_SQL = (Path(__file__).parent / "sql" / "shard_plan.sql").read_text()
_BLOCK = 512
_RECORD = 20 * _BLOCK  # GNU tar and tarfile pad archives to 10 KiB records
_NOT_META = {TAR_COL, KEY_COL}


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


def _padded(n: int) -> int:
    return n + (-n % _BLOCK)


def _json_value(col: str, v: Any) -> Any:
    if col == "phash" and v is not None:
        return f"{v:016x}"
    return v


def _index_members(con: Any, run_dir: Path, store: ImageStore) -> int:
    tars = [r[0] for r in con.execute(
        f"SELECT DISTINCT {TAR_COL} FROM src WHERE {TAR_COL} IS NOT NULL ORDER BY 1").fetchall()]
    cols: dict[str, list] = {"tar": [], "key": [], "abs": [], "ext": [], "offset": [], "size": []}
    for tar in tqdm(tars, desc="index crawl tars", unit="tar", leave=False):
        path = str(run_dir / tar)
        try:
            members = store.members(path)
        except ValueError as e:
            raise StageError(f"shard: crawl tar {path}: {e}") from e
        for m in members.values():
            for k, v in (("tar", tar), ("key", m.key), ("abs", path), ("ext", m.ext),
                         ("offset", m.offset), ("size", m.size)):
                cols[k].append(v)
    # list parameters, not con.register/pyarrow: building arrow arrays imports pandas (~0.5 s)
    con.execute("CREATE TEMP TABLE members AS SELECT unnest($1::VARCHAR[]) AS tar, "
                "unnest($2::VARCHAR[]) AS key, unnest($3::VARCHAR[]) AS abs, "
                "unnest($4::VARCHAR[]) AS ext, unnest($5::BIGINT[]) AS \"offset\", "
                "unnest($6::BIGINT[]) AS size",
                [cols[k] for k in ("tar", "key", "abs", "ext", "offset", "size")])
    return len(tars)


_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                         default=str)


def _write_shard(job: tuple[str, str, list[str], list[tuple]]
                 ) -> tuple[str, int, int, str, dict[str, list]]:
    """Write one shard; returns (name, samples, bytes, sha256, index rows).

    The whole tar is laid out in one zeroed buffer (headers, then each image read straight
    into its slot with preadv: no per-member bytes objects, padding comes free), hashed and
    written in one call each. Reads, hashing and the write release the GIL, so threads writing
    different shards overlap.
    """
    out_dir, name, meta_cols, batch = job
    index: dict[str, list] = {k: [] for k in ("uid", "key", "copy", "shard", "member",
                                              "position")}
    members: list[tuple[bytes, bytes | tuple[str, int, int]]] = []
    total = 0
    for position, row in enumerate(batch):
        _, key, copy, path, ext, offset, size = row[:7]
        meta = {c: _json_value(c, v) for c, v in zip(meta_cols, row[7:], strict=True)}
        meta["key"] = key
        image = f"{key}.{ext}"
        js = _JSON.encode(meta).encode()
        txt = (meta["caption"] or "").encode("utf-8")
        members += ((ustar_header(image, size), (path, offset, size)),
                    (ustar_header(f"{key}.json", len(js)), js),
                    (ustar_header(f"{key}.txt", len(txt)), txt))
        total += 3 * _BLOCK + _padded(size) + _padded(len(js)) + _padded(len(txt))
        for k, v in (("uid", meta["uid"]), ("key", key), ("copy", copy), ("shard", name),
                     ("member", image), ("position", position)):
            index[k].append(v)
    total += 2 * _BLOCK
    total += -total % _RECORD
    buf = bytearray(total)
    view = memoryview(buf)
    fds: dict[str, int] = {}
    try:
        pos = 0
        for header, data in members:
            h = len(header)
            view[pos:pos + h] = header
            pos += h
            if isinstance(data, bytes):
                view[pos:pos + len(data)] = data
                pos += _padded(len(data))
                continue
            path, offset, size = data
            fd = fds.get(path)
            if fd is None:
                fd = fds[path] = os.open(path, os.O_RDONLY)
            got = os.preadv(fd, [view[pos:pos + size]], offset) if size else 0
            if got != size:
                raise StageError(f"shard: {path}: short read at offset {offset} "
                                 f"({got} of {size} bytes)")
            pos += _padded(size)
    finally:
        for fd in fds.values():
            os.close(fd)
    digest = hashlib.sha256(view).hexdigest()
    with open(Path(out_dir) / name, "wb", buffering=0) as f:
        done = 0
        while done < total:
            done += f.write(view[done:])
    return name, len(batch), total, digest, index


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
    with ImageStore(max_open=1) as store:
        n_tars = _index_members(con, ctx.cfg.run_dir, store)
        con.execute(_PLAN_SQL, {"copies": s.upsample, "seed": s.seed})
        total = con.execute("SELECT count(*) FROM shard_plan").fetchall()[0][0]
        select_meta = ", ".join(f's."{c}"' for c in meta_cols)
        cur = con.execute(
            f"SELECT p.pos, p.sample_key, p.copy, p.abs, p.ext, p.\"offset\", p.size, "
            f"{select_meta} FROM shard_plan p JOIN src s USING (uid) ORDER BY p.pos")
        index: dict[str, list] = {k: [] for k in
                                  ("uid", "key", "copy", "shard", "member", "position")}
        shards: dict[str, list] = {"shard": [], "samples": [], "bytes": [], "sha256": []}

        def batches() -> Iterator[tuple[str, str, list[str], list[tuple]]]:
            i = 0
            while batch := cur.fetchmany(s.samples_per_shard):
                yield str(ctx.out_dir), shard_name(i), meta_cols, batch
                i += 1

        bar = tqdm(total=total, desc="shard", unit="sample", leave=False)
        # shards are independent: worker threads write them side by side (the heavy parts,
        # reading, hashing and writing big buffers, release the GIL)
        parallel = s.workers > 1 and total > s.samples_per_shard
        with ThreadPoolExecutor(s.workers if parallel else 1) as pool:
            done = pool.map(_write_shard, batches())
            for name, n, nbytes, digest, rows in done:
                for k, v in (("shard", name), ("samples", n), ("bytes", nbytes),
                             ("sha256", digest)):
                    shards[k].append(v)
                for k, vals in rows.items():
                    index[k] += vals
                bar.update(n)
        bar.close()
    seconds = time.time() - started

    pq.write_table(pa.table(index, schema=pa.schema([
        ("uid", pa.string()), ("key", pa.string()), ("copy", pa.int32()), ("shard", pa.string()),
        ("member", pa.string()), ("position", pa.int32())])), ctx.out_dir / "index.parquet")
    pq.write_table(pa.table(shards, schema=pa.schema([
        ("shard", pa.string()), ("samples", pa.int64()), ("bytes", pa.int64()),
        ("sha256", pa.string())])), ctx.out_dir / "shards.parquet")
    sizes = dict(zip(shards["shard"], shards["samples"], strict=True))
    (ctx.out_dir / "sizes.json").write_text(json.dumps(sizes, indent=1))

    con.execute(f"COPY (SELECT *, {int(s.upsample)}::INTEGER AS copies FROM src "
                f"WHERE uid IN (SELECT uid FROM shard_plan) ORDER BY uid) "
                f"TO '{ctx.kept_path}' (FORMAT parquet)")
    con.execute(f"""COPY (
        SELECT s.uid, '{ctx.spec.name}' AS stage, 'unreadable_image' AS reason,
               'no image member ' || coalesce(s.{KEY_COL}, 'NULL') || ' in '
               || coalesce(s.{TAR_COL}, 'NULL') AS detail
        FROM src s ANTI JOIN members m ON m.tar = s.{TAR_COL} AND m.key = s.{KEY_COL}
        ORDER BY s.uid) TO '{ctx.dropped_path}' (FORMAT parquet)""")
    con.close()
    written = sum(shards["bytes"])
    return {
        "shards": len(shards["shard"]), "samples_written": total, "upsample": s.upsample,
        "seed": s.seed, "bytes_written": written, "source_tars": n_tars,
        "shard_seconds": round(seconds, 3), "workers": s.workers if parallel else 1,
        "mb_per_s": round(written / 1e6 / seconds, 1) if seconds > 0 else None,
    }
