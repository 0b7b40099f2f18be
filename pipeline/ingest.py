"""Ingest: URL–caption manifests (csv, tsv, json, jsonl, parquet, .gz) → uid-keyed pairs.

Every source file is read by DuckDB. Captions are repaired with ftfy (only those
with non-ASCII or control characters or an HTML entity can need it, so the rest
skip it, and ``pipeline.caption_fix`` skips the call where ftfy's own checks say it
would change nothing) and whitespace-normalized; URLs are
validated (http/https, a host, sane length, no raw whitespace) and their scheme
and host lower-cased; each pair gets a stable uid, md5(url + US + caption).
Rows a reader cannot use are not lost: a CSV/TSV line DuckDB cannot decode (bad UTF-8,
ragged) and a JSON Lines line that is not one JSON object are dropped with reason
``unreadable_row`` and ``file:line: why`` in ``detail``. A missing file, a directory, a
missing or twice-named column fails the stage, naming the file and the column.
"""

from __future__ import annotations

import csv
import glob
import gzip
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.caption_fix import fix_caption
from pipeline.config import BuildConfig, Source
from pipeline.progress import progress
from pipeline.stage import StageContext, StageError, StageSpec

SQL_DIR = Path(__file__).parent / "sql"
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


def fingerprint_inputs(cfg: BuildConfig, spec: StageSpec) -> dict[str, Any]:
    try:
        files = source_files(cfg)
    except StageError:
        return {"missing": True}  # run() reports the error properly
    return {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for _, _, f in files}


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _sql_ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def _reader(path: Path, fmt: str, src: Source, rejects: str | None,
            sniff: bool = False) -> str:
    p = _sql_str(str(path))
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
            f"{_sql_str(c)}: 'VARCHAR'" for c in dict.fromkeys([src.url_col, src.caption_col])
        ) + "}"
        return f"read_json({p}, format={style}, records=true{cols})"
    return f"read_parquet({p})"


def _columns(con: duckdb.DuckDBPyConnection, reader: str, path: Path) -> list[str]:
    try:
        return [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {reader}").fetchall()]
    except duckdb.Error as e:
        raise StageError(f"{path}: cannot read it: {str(e).splitlines()[0]}") from e


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


def _jsonl_batches(path: Path, chunk: int | None = None) -> Iterator[pa.Table]:
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


def _jsonl_sample(con: duckdb.DuckDBPyConnection, path: Path) -> tuple[list[str], str | None]:
    """(the keys of the object lines among the first lines, in order of first appearance;
    whether the file looks like one JSON array: 'pretty' or 'one_line', else None)."""
    first = next(_jsonl_batches(path, chunk=1 << 22), None)
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


def _json_pointer(key: str) -> str:
    return "/" + key.replace("~", "~0").replace("/", "~1")


def load_jsonl(con: duckdb.DuckDBPyConnection, i: int, n: int, src: Source,
               path: Path) -> None:
    """Append a JSON Lines file's rows to raw and its bad lines to jsonl_bad(file_id, line,
    why); fails only for a missing column, a JSON array file, or bytes that do not read."""
    try:
        keys, shape = _jsonl_sample(con, path)
    except (OSError, EOFError, zlib.error) as e:
        raise StageError(f"{path}: cannot read it: {e}") from e
    if keys:  # no object among the first lines: every line is judged below, none fails
        check_columns_present(path, src, i, keys)
    try:
        con.execute(f"INSERT INTO raw SELECT {i}, {n}, {_sql_ident(src.url_col)}, "
                    f"{_sql_ident(src.caption_col)} FROM {_reader(path, 'jsonl', src, None)}")
        return
    except duckdb.Error:
        pass  # a line read_json refuses (it rolled back): read the file line by line
    script = (SQL_DIR / "ingest_jsonl_lines.sql").read_text()
    for name, value in (("$url_key", _sql_str(_json_pointer(src.url_col))),
                        ("$caption_key", _sql_str(_json_pointer(src.caption_col))),
                        ("$src_order", str(i)), ("$file_id", str(n))):
        script = script.replace(name, value)
    before = con.execute("SELECT count(*) FROM raw").fetchall()[0][0]
    try:
        for batch in _jsonl_batches(path):
            con.register("jsonl_batch", batch)
            try:
                con.execute(script)
            finally:
                con.unregister("jsonl_batch")
    except (OSError, EOFError, zlib.error, duckdb.Error) as e:
        raise StageError(f"{path}: cannot read it: {str(e).splitlines()[0]}") from e
    if shape and con.execute("SELECT count(*) FROM raw").fetchall()[0][0] == before:
        how = "spread over lines" if shape == "pretty" else "on one line"
        raise StageError(f"{path}: this is one JSON array ({how}), not JSON Lines (one object "
                         f"per line): set sources[{i}].format: json")


def load_raw(con: duckdb.DuckDBPyConnection, cfg: BuildConfig) -> int:
    """Read every source file into table raw and the lines that do not read into table
    unreadable(uid, detail); returns the number of rows read into raw."""
    # Rows carry a file number, not the file's path and source tag: in-memory tables are not
    # compressed, and two strings per row were ~1 GB of a 10M-row ingest's peak.
    con.execute("CREATE OR REPLACE TEMP TABLE raw (src_order INTEGER, file_id INTEGER, "
                "url_raw VARCHAR, caption_raw VARCHAR)")
    con.execute("CREATE OR REPLACE TEMP TABLE files (file_id INTEGER, source VARCHAR, "
                "file VARCHAR)")
    con.execute("CREATE OR REPLACE TEMP TABLE jsonl_bad (file_id INTEGER, line BIGINT, "
                "why VARCHAR)")
    rejects = []
    files = source_files(cfg)
    for n, (i, src, path) in enumerate(progress(files, desc="ingest: reading", unit="file",
                                            disable=len(files) < 3)):
        if path.stat().st_size == 0:
            raise StageError(f"{path}: the file is empty (sources[{i}])")
        fmt = detect_format(path, src.format)
        tag = src.tag or path.name.split(".")[0]
        con.execute("INSERT INTO files VALUES (?, ?, ?)", [n, tag, str(path)])
        if fmt == "jsonl":
            load_jsonl(con, i, n, src, path)
            continue
        cols = _columns(con, _reader(path, fmt, src, None, sniff=True), path)
        check_repeated_columns(path, fmt, src, i, cols)
        check_columns_present(path, src, i, cols)
        table = f"rej_{n}" if fmt in ("csv", "tsv") else None
        try:
            con.execute(
                f"INSERT INTO raw SELECT {i}, {n}, {_sql_ident(src.url_col)}::VARCHAR, "
                f"{_sql_ident(src.caption_col)}::VARCHAR "
                f"FROM {_reader(path, fmt, src, table)}")
        except duckdb.Error as e:
            raise StageError(f"{path}: cannot read it: {str(e).splitlines()[0]}") from e
        if table:
            rejects.append(table)
    # A rejected CSV line can be reported once per bad column: one ledger row per line.
    con.execute("CREATE OR REPLACE TEMP TABLE unreadable AS "
                "SELECT md5(file || ':' || line) AS uid, "
                "file || ':' || line || ': ' || why AS detail "
                "FROM jsonl_bad JOIN files USING (file_id)")
    for t in rejects:
        con.execute(f"INSERT INTO unreadable SELECT md5(file_path || ':' || line), "
                    f"any_value(file_path || ':' || line || ': ' || error_message) "
                    f"FROM {t} JOIN {t}_scan USING (scan_id) GROUP BY file_path, line")
    return con.execute("SELECT count(*) FROM raw").fetchall()[0][0]


def mark_special_captions(con: duckdb.DuckDBPyConnection, repair: bool) -> int:
    """Table special(r, c): the raw rowid of every caption with a non-ASCII or control
    character or a '&', and that caption after ftfy when ``repair``; returns how many changed.

    Only these captions can need ftfy (one vectorized regex finds them; 3 % of the bench
    manifest), and the rest are printable ASCII, which the ingest script normalizes with plain
    string tests. They are repaired in Python outside any DuckDB query: the same work as a
    Python UDF inside the parallel query cost ~1.7x the CPU on 1M rows (2.5-2.9 vs 1.6 CPU-s).
    The script joins the small table back by rowid: an UPDATE of raw cost 4x that join."""
    todo = con.execute("SELECT rowid AS r, caption_raw AS c FROM raw "
                       r"WHERE regexp_matches(caption_raw, '[^\x20-\x7E]|&')").fetchall()
    rows = [r for r, _ in todo]
    texts = [c for _, c in todo]
    changed = 0
    if repair:
        # Web captions repeat ("Café", stock-photo titles): each distinct one is fixed once.
        fixed_of: dict[str, str] = {}
        for i, c in enumerate(progress(texts, desc="ingest: ftfy", unit="caption",
                                   disable=len(texts) < 65536, mininterval=1)):
            fixed = fixed_of.get(c)
            if fixed is None:
                fixed = fixed_of[c] = fix_caption(c)
            if fixed != c:
                texts[i] = fixed
                changed += 1
    con.register("special_captions", pa.table({"r": pa.array(rows, pa.int64()),
                                               "c": pa.array(texts, pa.string())}))
    con.execute("CREATE OR REPLACE TEMP TABLE special AS SELECT * FROM special_captions")
    con.unregister("special_captions")
    return changed


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    con = ctx.connect()
    rows_read = load_raw(con, cfg)
    repaired = mark_special_captions(con, repair=cfg.ingest.ftfy)
    script = (SQL_DIR / "ingest_stage.sql").read_text()
    script = script.replace("$max_url_length", str(int(cfg.ingest.max_url_length)))
    con.execute(script)
    stage = _sql_str(ctx.spec.name)
    con.execute(f"COPY (SELECT uid, url, caption, source FROM fated WHERE reason IS NULL) "
                f"TO '{ctx.kept_path}' (FORMAT parquet)")
    con.execute(
        f"COPY (SELECT uid, {stage} AS stage, reason, "
        f"CASE reason WHEN 'exact_repeat' THEN 'same url and caption as an earlier row' "
        f"ELSE coalesce(url, '') END || ' (' || file || ')' AS detail "
        f"FROM fated WHERE reason IS NOT NULL "
        f"UNION ALL SELECT uid, {stage}, 'unreadable_row', detail FROM unreadable) "
        f"TO '{ctx.dropped_path}' (FORMAT parquet)")
    n_unreadable = con.execute("SELECT count(*) FROM unreadable").fetchall()[0][0]
    by_source = dict(con.execute(
        f"SELECT source, count(*) FROM read_parquet('{ctx.kept_path}') GROUP BY 1 ORDER BY 1"
    ).fetchall())
    return {"rows_in": rows_read + n_unreadable, "kept_by_source": by_source,
            "captions_repaired_by_ftfy": repaired,
            "files": len(source_files(cfg))}
