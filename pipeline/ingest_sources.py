"""Reading manifest files for ingest: formats, the files of each source, their columns.

Every source file is read by DuckDB (``reader_sql``); the checks here fail early, naming
the file and the key, for a missing file, a directory, a missing or twice-named column. JSON
Lines files have a second, line-wise reader (``jsonl_batches``) for files DuckDB's
read_json refuses as a whole, so that one bad line costs one row, not the file.
"""

from __future__ import annotations

import csv
import glob
import gzip
import re
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import BuildConfig, Source
from pipeline.stage import StageError, disk_full

FORMATS = ("csv", "tsv", "json", "jsonl", "parquet")
SUFFIXES = ((".tsv", "tsv"), (".csv", "csv"), (".jsonl", "jsonl"), (".ndjson", "jsonl"),
            (".json", "json"), (".parquet", "parquet"), (".txt", "tsv"))
JSONL_CHUNK = 32 << 20  # bytes of lines handed to DuckDB at a time on the line-wise path
JSONL_MAX_LINE = 64 << 20  # a "line" longer than this is not JSON Lines (read_json's cap: 16)
JSONL_SAMPLE = 20480  # lines whose keys are checked for the columns: read_json's sample_size


def detect_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix, fmt in SUFFIXES:
        if name.endswith(suffix):
            return fmt
    raise StageError(f"{path}: cannot tell the format from the file name; set format: "
                     f"one of {', '.join(FORMATS)}")


def _glob_hint(folder: Path, shown: str) -> str:
    """A glob of the manifest files in a folder given as a source, to suggest in the error."""
    names = [folder.name.lower()] + sorted(p.name.lower() for p in folder.iterdir()
                                           if p.is_file())
    for name in names:
        gz = ".gz" if name.endswith(".gz") else ""
        for suffix, _ in SUFFIXES:
            if name.removesuffix(gz).endswith(suffix):
                return f"{shown}/*{suffix}{gz}"
    return f"{shown}/*"


def source_files(cfg: BuildConfig) -> list[tuple[int, Source, Path]]:
    """Every file of every source, in build order; a source matching nothing, or only
    directories, is an error (read as an empty source, it used to pass with 0 rows)."""
    out = []
    for i, src in enumerate(cfg.sources):
        pattern = str(cfg.resolve(src.path))
        shown = src.path.rstrip("/") or src.path
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern))
            files = [p for p in matches if p.is_file()]
            if matches and not files:
                raise StageError(f"sources[{i}].path: {src.path} matches only directories, "
                                 f"not files ({', '.join(p.name for p in matches[:3])}"
                                 f"{', ...' if len(matches) > 3 else ''})")
        elif Path(pattern).is_dir():
            raise StageError(f"sources[{i}].path: {shown} is a directory, not a file (use a "
                             f"glob such as {_glob_hint(Path(pattern), shown)})")
        else:
            files = [Path(pattern)] if Path(pattern).exists() else []
        if not files:
            raise StageError(f"sources[{i}].path: no file matches {pattern}")
        out.extend((i, src, f) for f in files)
    return out



def sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def sql_ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def reader_sql(path: Path, fmt: str, src: Source, rejects: str | None,
            sniff: bool = False) -> str:
    p = sql_str(str(path))
    if fmt in ("csv", "tsv"):
        delim = r"'\t'" if fmt == "tsv" else "','"
        # TSV manifests (CC3M) carry raw quotes inside captions: no quoting in TSV.
        quoting = ", quote='', escape=''" if fmt == "tsv" else ""
        store = (f", store_rejects=true, rejects_table='{rejects}', "
                 f"rejects_scan='{rejects}_scan'") if rejects else ""
        if sniff:  # bad lines are counted by the real read; here we only want the columns
            store = ", ignore_errors=true"
        return (f"read_csv({p}, delim={delim}, header={str(src.header).lower()}, "
                f"all_varchar=true, strict_mode=false{quoting}{store})")
    if fmt in ("json", "jsonl"):
        style = "'newline_delimited'" if fmt == "jsonl" else "'auto'"
        # The two columns read as VARCHAR, named: DuckDB's type detection turns a column that
        # mixes strings with other values into JSON, whose ::VARCHAR keeps the quotes (every
        # url '"http://..."', dropped as bad_url_scheme). Typed, a string is itself and any
        # other value its JSON text, as json_extract_string gives on the line-wise path.
        cols = "" if sniff else ", columns={" + ", ".join(
            f"{sql_str(c)}: 'VARCHAR'" for c in dict.fromkeys([src.url_col, src.caption_col])
        ) + "}"
        return f"read_json({p}, format={style}, records=true{cols})"
    return f"read_parquet({p})"


def read_error(path: Path, e: BaseException) -> BaseException:
    """The error to raise when reading ``path`` failed with ``e``: "cannot read it", naming the
    file, except for a full disk (ingest writes as it reads), which stays itself so that the
    stage runner names the disk."""
    if disk_full(e):
        return e
    return StageError(f"{path}: cannot read it: {str(e).splitlines()[0]}")


def columns_of(con: duckdb.DuckDBPyConnection, reader: str, path: Path) -> list[str]:
    try:
        return [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {reader}").fetchall()]
    except duckdb.Error as e:
        raise read_error(path, e) from e


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _header_names(path: Path, fmt: str) -> list[str]:
    """The column names exactly as the file has them (DuckDB renames a repeat to name_1)."""
    if fmt == "parquet":
        return pq.read_schema(path).names
    with _open_binary(path) as f:
        first = f.readline(1 << 20).decode("utf-8-sig", errors="replace").rstrip("\r\n")
    if fmt == "tsv":
        return first.split("\t")
    return next(csv.reader([first]), [])


def check_columns_present(path: Path, src: Source, i: int, cols: list[str]) -> None:
    for key, col in (("url_col", src.url_col), ("caption_col", src.caption_col)):
        if col not in cols:
            raise StageError(f"{path}: no column {col!r} (sources[{i}].{key}); "
                             f"its columns are: {', '.join(cols[:20])}")


_COUNT = {2: "two", 3: "three", 4: "four"}


def check_repeated_columns(path: Path, fmt: str, src: Source, i: int,
                           cols: list[str]) -> None:
    """Fail when a column we read is named twice: DuckDB would silently take the first.

    DuckDB binds names case-insensitively and calls the second 'caption' 'caption_1', so
    only then is the header itself read. A repeat of any other column is left to DuckDB."""
    for key, col in (("url_col", src.url_col), ("caption_col", src.caption_col)):
        renamed = re.compile(re.escape(col) + r"_\d+", re.IGNORECASE)
        if fmt not in ("csv", "tsv", "parquet") or not any(renamed.fullmatch(c) for c in cols):
            continue
        names = _header_names(path, fmt)
        at = [j for j, c in enumerate(names, 1) if c.lower() == col.lower()]
        if len(at) > 1:
            spelled = {names[j - 1] for j in at}
            cases = (f"; names match case-insensitively: "
                     f"{', '.join(repr(names[j - 1]) for j in at)}") if len(spelled) > 1 else ""
            where = ", ".join(map(str, at[:-1])) + f" and {at[-1]}"
            raise StageError(f"{path}: the header has {_COUNT.get(len(at), len(at))} columns "
                             f"named {col!r} (columns {where}{cases}); rename one or set "
                             f"sources[{i}].{key}")


# --- JSON Lines ---------------------------------------------------------------------------
# read_json reads a clean file fastest (0.2 CPU-s per 1M lines) but refuses the whole file for
# one bad line, and names no line number we could record per row. So a file is read by it
# first, and only when it refuses is the file read again line by line: Python cuts the bytes
# at '\n' (numpy; lines numbered from 1) and DuckDB judges and parses each line
# (sql/ingest_jsonl_lines.sql), dropping bad ones with their numbers (~1 CPU-s per 1M lines).


def jsonl_batches(path: Path, chunk: int | None = None) -> Iterator[pa.Table]:
    """The file's lines as tables of (k: 1-based line number, line: bytes incl. '\\n')."""
    chunk = chunk or JSONL_CHUNK
    base, rest = 0, b""
    with _open_binary(path) as f:
        while True:
            data = f.read(chunk)
            buf = rest + data
            if base == 0 and buf.startswith(b"\xef\xbb\xbf"):
                buf = buf[3:]  # a BOM: read_json refuses it, the text after it is fine
            ends = np.flatnonzero(np.frombuffer(buf, np.uint8) == 10) + 1
            if not data and buf and (not ends.size or ends[-1] != len(buf)):
                ends = np.append(ends, len(buf))  # the last line has no '\n'
            if not ends.size and len(buf) > JSONL_MAX_LINE:
                raise StageError(f"{path}: line {base + 1} runs past {JSONL_MAX_LINE >> 20} MiB "
                                 f"without a newline: not JSON Lines")
            if ends.size:
                n = int(ends.size)
                offsets = pa.py_buffer(np.concatenate(([0], ends)).astype(np.int64))
                lines = pa.LargeBinaryArray.from_buffers(pa.large_binary(), n,
                                                         [None, offsets, pa.py_buffer(buf)])
                batch = pa.record_batch([pa.array(np.arange(base + 1, base + n + 1)), lines],
                                        names=["k", "line"])
                # slices so that DuckDB's threads share the work
                yield pa.Table.from_batches([batch.slice(j, 1 << 16) for j in range(0, n, 1 << 16)])
                base += n
                rest = buf[int(ends[-1]):]
            else:
                rest = buf
            if not data:
                return


def jsonl_sample(con: duckdb.DuckDBPyConnection, path: Path) -> tuple[list[str], str | None]:
    """(the keys of the object lines among the first lines, in order of first appearance;
    whether the file looks like one JSON array: 'pretty' or 'one_line', else None)."""
    first = next(jsonl_batches(path, chunk=1 << 22), None)
    if first is None:
        return [], None
    con.register("jsonl_sample", first.slice(0, JSONL_SAMPLE))
    try:
        rows = con.execute(
            "SELECT keys FROM (SELECT k, CASE WHEN json_valid(t) AND prefix(ltrim(t, E' \\t\\r'), "
            "'{') THEN json_keys(t) END AS keys FROM (SELECT k, try(decode(line)) t "
            "FROM jsonl_sample)) WHERE keys IS NOT NULL ORDER BY k").fetchall()
        head = con.execute(
            "SELECT ltrim(t, E' \\t\\r\\n'), json_valid(t), "
            "CASE WHEN json_valid(t) THEN json_type(t, '$[0]') END FROM "
            "(SELECT k, try(decode(line)) t FROM jsonl_sample) "
            "WHERE trim(t, E' \\t\\r\\n') <> '' ORDER BY k LIMIT 1").fetchall()
    finally:
        con.unregister("jsonl_sample")
    keys = list(dict.fromkeys(k for (ks,) in rows for k in ks))
    shape = None
    if head and head[0][0].startswith("["):
        if not head[0][1]:
            shape = "pretty"  # '[' opening an array that spans lines
        elif head[0][2] == "OBJECT":
            shape = "one_line"  # [{...}, {...}] on one line
    return keys, shape


def json_pointer(key: str) -> str:
    return "/" + key.replace("~", "~0").replace("/", "~1")
