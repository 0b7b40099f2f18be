"""Ingest: URL–caption manifests (csv, tsv, json, jsonl, parquet, .gz) → uid-keyed pairs.

Every source file is read by DuckDB (``pipeline.ingest_sources``) and streamed through
one staging query (``sql/ingest_stage.sql``) into a Parquet part of its own, so memory does
not grow with the rows: no table ever holds them all. Captions are repaired with ftfy (only those
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

import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from pipeline.caption_fix import fix_caption
from pipeline.config import BuildConfig, Source
from pipeline.ingest_sources import (
    check_columns_present,
    check_repeated_columns,
    columns_of,
    detect_format,
    json_pointer,
    jsonl_batches,
    jsonl_sample,
    read_error,
    reader_sql,
    source_files,
    sql_ident,
    sql_str,
)
from pipeline.progress import progress
from pipeline.stage import StageContext, StageError, StageSpec

SQL_DIR = Path(__file__).parent / "sql"


def fingerprint_inputs(cfg: BuildConfig, spec: StageSpec) -> dict[str, Any]:
    try:
        files = source_files(cfg)
    except StageError:
        return {"missing": True}  # run() reports the error properly
    return {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for _, _, f in files}


def stage_sql(cfg: BuildConfig, src: str, extra: str = "", keep_raw: bool = False) -> str:
    """The staging SELECT over relation ``src`` (columns url_raw, caption_raw and ``extra``)."""
    script = (SQL_DIR / "ingest_stage.sql").read_text()
    for name, value in (("$src", src), ("$extra", extra), ("$keep_raw", str(keep_raw).lower()),
                        ("$max_url_length", str(int(cfg.ingest.max_url_length)))):
        script = script.replace(name, value)
    return script


class Parts:
    """The staged Parquet parts of one ingest, numbered in build order (file, then read)."""

    def __init__(self, cfg: BuildConfig, folder: Path) -> None:
        self.cfg, self.folder, self.count, self.rows = cfg, folder, 0, 0
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def glob(self) -> str:
        return sql_str(str(self.folder / "part-*.parquet"))

    def write(self, con: duckdb.DuckDBPyConnection, file_id: int, src: str) -> int:
        """Stage relation ``src`` (url_raw, caption_raw) of file ``file_id`` into the next
        part; returns its rows. A failed write leaves no part behind."""
        path = self.folder / f"part-{self.count:06d}.parquet"
        select = stage_sql(self.cfg, src, keep_raw=self.cfg.ingest.ftfy)
        try:
            n = con.execute(f"COPY (SELECT {self.count}::INTEGER AS part, {file_id}::INTEGER "
                            f"AS file_id, * FROM ({select})) TO {sql_str(str(path))} "
                            f"(FORMAT parquet)").fetchall()[0][0]
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        self.count += 1
        self.rows += n
        return n


def load_jsonl(con: duckdb.DuckDBPyConnection, parts: Parts, i: int, n: int, src: Source,
               path: Path) -> None:
    """Stage a JSON Lines file's rows and append its bad lines to jsonl_bad(file_id, line,
    why); fails only for a missing column, a JSON array file, or bytes that do not read."""
    try:
        keys, shape = jsonl_sample(con, path)
    except (OSError, EOFError, zlib.error) as e:
        raise StageError(f"{path}: cannot read it: {e}") from e
    if keys:  # no object among the first lines: every line is judged below, none fails
        check_columns_present(path, src, i, keys)
    try:
        parts.write(con, n, f"(SELECT {sql_ident(src.url_col)} AS url_raw, "
                            f"{sql_ident(src.caption_col)} AS caption_raw "
                            f"FROM {reader_sql(path, 'jsonl', src, None)})")
        return
    except duckdb.Error:
        pass  # a line read_json refuses (its part was removed): read the file line by line
    script = (SQL_DIR / "ingest_jsonl_lines.sql").read_text()
    for name, value in (("$url_key", sql_str(json_pointer(src.url_col))),
                        ("$caption_key", sql_str(json_pointer(src.caption_col))),
                        ("$file_id", str(n))):
        script = script.replace(name, value)
    rows = 0
    try:
        for batch in jsonl_batches(path):
            con.register("jsonl_batch", batch)
            try:
                con.execute(script)
                rows += parts.write(con, n, "(SELECT uc[1] AS url_raw, uc[2] AS caption_raw "
                                            "FROM jsonl_chunk WHERE why IS NULL)")
            finally:
                con.unregister("jsonl_batch")
                con.execute("DROP TABLE IF EXISTS jsonl_chunk")
    except (OSError, EOFError, zlib.error, duckdb.Error) as e:
        raise read_error(path, e) from e
    if shape and rows == 0:
        how = "spread over lines" if shape == "pretty" else "on one line"
        raise StageError(f"{path}: this is one JSON array ({how}), not JSON Lines (one object "
                         f"per line): set sources[{i}].format: json")


def stage_sources(con: duckdb.DuckDBPyConnection, cfg: BuildConfig, parts: Parts) -> None:
    """Stage every source file into ``parts``; the lines that do not read go to table
    unreadable(uid, detail), the files to files(file_id, source, file)."""
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
            load_jsonl(con, parts, i, n, src, path)
            continue
        cols = columns_of(con, reader_sql(path, fmt, src, None, sniff=True), path)
        check_repeated_columns(path, fmt, src, i, cols)
        check_columns_present(path, src, i, cols)
        table = f"rej_{n}" if fmt in ("csv", "tsv") else None
        try:
            parts.write(con, n, f"(SELECT {sql_ident(src.url_col)}::VARCHAR AS url_raw, "
                                f"{sql_ident(src.caption_col)}::VARCHAR AS caption_raw "
                                f"FROM {reader_sql(path, fmt, src, table)})")
        except duckdb.Error as e:
            raise read_error(path, e) from e
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


def repair_captions(con: duckdb.DuckDBPyConnection, cfg: BuildConfig,
                    parts: Parts) -> dict[str, Any]:
    """Table repaired(part, r, uid, caption): every staged row whose caption ftfy changes,
    staged again with the repaired caption. Returns how many there are and what ftfy cost:
    its seconds and the distinct captions it saw (``witforge plan`` scales that part by the
    distinct captions, which grow slower than the rows).

    Only the captions the staging query kept raw can need ftfy (3 % of the bench manifest).
    They are repaired in Python outside any DuckDB query: the same work as a Python UDF
    inside the parallel query cost ~1.7x the CPU on 1M rows (2.5-2.9 vs 1.6 CPU-s)."""
    todo = con.sql(f"SELECT part, file_row_number AS r, url_raw, caption_raw "
                   f"FROM read_parquet({parts.glob}, file_row_number = true) "
                   f"WHERE caption_raw IS NOT NULL").to_arrow_table()
    texts = todo.column("caption_raw").to_pylist()
    changed, fixed = [], []
    # Web captions repeat ("Café", stock-photo titles): each distinct one is fixed once.
    fixed_of: dict[str, str] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    for j, c in enumerate(progress(texts, desc="ingest: ftfy", unit="caption",
                               disable=len(texts) < 65536, mininterval=1)):
        f = fixed_of.get(c)
        if f is None:
            f = fixed_of[c] = fix_caption(c)
        if f != c:
            changed.append(j)
            fixed.append(f)
    cost = {"captions_repaired_by_ftfy": len(changed), "ftfy_captions": len(texts),
            "ftfy_distinct_captions": len(fixed_of),
            "ftfy_seconds": round(time.perf_counter() - wall, 6),
            "ftfy_cpu_seconds": round(time.process_time() - cpu, 6)}
    del texts, fixed_of
    fixes = todo.take(pa.array(changed, pa.int64())).drop_columns(["caption_raw"]) \
        .append_column("caption_raw", pa.array(fixed, pa.string()))
    con.register("caption_fixes", fixes)
    try:
        con.execute(f"CREATE OR REPLACE TEMP TABLE repaired AS SELECT part, r, uid, caption "
                    f"FROM ({stage_sql(cfg, 'caption_fixes', extra=', part, r')})")
    finally:
        con.unregister("caption_fixes")
    return cost


def define_staged(con: duckdb.DuckDBPyConnection, parts: Parts, repaired: int) -> None:
    """View staged(part, r, file_id, uid, url, caption, bad_reason) over the parts."""
    # without repairs, no join to pay on each of the three later scans
    uid, caption, join = ("coalesce(f.uid, p.uid)", "coalesce(f.caption, p.caption)",
                          "LEFT JOIN repaired f ON p.part = f.part AND p.file_row_number = f.r"
                          ) if repaired else ("p.uid", "p.caption", "")
    con.execute(f"CREATE OR REPLACE TEMP VIEW staged AS SELECT p.part, p.file_row_number AS r, "
                f"p.file_id, {uid} AS uid, p.url, {caption} AS caption, p.bad_reason "
                f"FROM read_parquet({parts.glob}, file_row_number = true) p {join}")


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    con = ctx.connect()
    parts = Parts(cfg, ctx.out_dir / "_staged")
    stage_sources(con, cfg, parts)
    ftfy = repair_captions(con, cfg, parts) if cfg.ingest.ftfy else {}
    define_staged(con, parts, ftfy.get("captions_repaired_by_ftfy", 0))
    con.execute((SQL_DIR / "ingest_repeats.sql").read_text())
    stage = sql_str(ctx.spec.name)
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
    con.close()
    shutil.rmtree(parts.folder)
    return {"rows_in": parts.rows + n_unreadable, "kept_by_source": by_source,
            "captions_repaired_by_ftfy": 0, **ftfy, "files": len(source_files(cfg))}
