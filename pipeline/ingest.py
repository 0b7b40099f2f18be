"""Ingest: URL–caption manifests (csv, tsv, json, jsonl, parquet, .gz) → uid-keyed pairs.

Every source file is read by DuckDB. Captions are repaired with ftfy (only those
with non-ASCII or control characters or an HTML entity can need it, so the rest
skip it, and ``pipeline.caption_fix`` skips the call where ftfy's own checks say it
would change nothing) and whitespace-normalized; URLs are
validated (http/https, a host, sane length, no raw whitespace) and their scheme
and host lower-cased; each pair gets a stable uid, md5(url + US + caption).
Rows a CSV reader cannot decode (bad UTF-8, ragged lines) are not lost: they are
dropped with reason ``unreadable_row`` and the file and line in ``detail``.
A missing file or column fails the stage, naming the file and the column.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from pipeline.caption_fix import fix_caption
from pipeline.config import BuildConfig, Source
from pipeline.progress import progress
from pipeline.stage import StageContext, StageError, StageSpec

SQL_DIR = Path(__file__).parent / "sql"
FORMATS = ("csv", "tsv", "json", "jsonl", "parquet")


def detect_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix, fmt in ((".tsv", "tsv"), (".csv", "csv"), (".jsonl", "jsonl"),
                        (".ndjson", "jsonl"), (".json", "json"), (".parquet", "parquet"),
                        (".txt", "tsv")):
        if name.endswith(suffix):
            return fmt
    raise StageError(f"{path}: cannot tell the format from the file name; set format: "
                     f"one of {', '.join(FORMATS)}")


def source_files(cfg: BuildConfig) -> list[tuple[int, Source, Path]]:
    """Every file of every source, in build order; a source matching nothing is an error."""
    out = []
    for i, src in enumerate(cfg.sources):
        pattern = str(cfg.resolve(src.path))
        files = sorted(Path(p) for p in glob.glob(pattern)) if glob.has_magic(pattern) else (
            [Path(pattern)] if Path(pattern).exists() else [])
        if not files:
            raise StageError(f"sources[{i}].path: no file matches {pattern}")
        out.extend((i, src, f) for f in files if f.is_file())
    return out


def fingerprint_inputs(cfg: BuildConfig, spec: StageSpec) -> dict[str, Any]:
    try:
        files = source_files(cfg)
    except StageError:
        return {"missing": True}  # run() reports the error properly
    return {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for _, _, f in files}


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


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
        return f"read_json({p}, format={style}, records=true)"
    return f"read_parquet({p})"


def _columns(con: duckdb.DuckDBPyConnection, reader: str, path: Path) -> list[str]:
    try:
        return [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {reader}").fetchall()]
    except duckdb.Error as e:
        raise StageError(f"{path}: cannot read it: {str(e).splitlines()[0]}") from e


def load_raw(con: duckdb.DuckDBPyConnection, cfg: BuildConfig) -> tuple[int, list[str]]:
    """Read every source file into table raw; returns (rows read, reject table names)."""
    # Rows carry a file number, not the file's path and source tag: in-memory tables are not
    # compressed, and two strings per row were ~1 GB of a 10M-row ingest's peak.
    con.execute("CREATE OR REPLACE TEMP TABLE raw (src_order INTEGER, file_id INTEGER, "
                "url_raw VARCHAR, caption_raw VARCHAR)")
    con.execute("CREATE OR REPLACE TEMP TABLE files (file_id INTEGER, source VARCHAR, "
                "file VARCHAR)")
    rejects = []
    files = source_files(cfg)
    for n, (i, src, path) in enumerate(progress(files, desc="ingest: reading", unit="file",
                                            disable=len(files) < 3)):
        if path.stat().st_size == 0:
            raise StageError(f"{path}: the file is empty (sources[{i}])")
        fmt = detect_format(path, src.format)
        cols = _columns(con, _reader(path, fmt, src, None, sniff=True), path)
        for key, col in (("url_col", src.url_col), ("caption_col", src.caption_col)):
            if col not in cols:
                raise StageError(f"{path}: no column {col!r} (sources[{i}].{key}); "
                                 f"its columns are: {', '.join(cols[:20])}")
        table = f"rej_{n}" if fmt in ("csv", "tsv") else None
        tag = src.tag or path.name.split(".")[0]
        con.execute("INSERT INTO files VALUES (?, ?, ?)", [n, tag, str(path)])
        try:
            con.execute(
                f'INSERT INTO raw SELECT {i}, {n}, '
                f'"{src.url_col}"::VARCHAR, "{src.caption_col}"::VARCHAR '
                f"FROM {_reader(path, fmt, src, table)}")
        except duckdb.Error as e:
            raise StageError(f"{path}: cannot read it: {str(e).splitlines()[0]}") from e
        if table:
            rejects.append(table)
    rows = con.execute("SELECT count(*) FROM raw").fetchall()[0][0]
    return rows, rejects


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
    rows_read, rejects = load_raw(con, cfg)
    repaired = mark_special_captions(con, repair=cfg.ingest.ftfy)
    script = (SQL_DIR / "ingest_stage.sql").read_text()
    script = script.replace("$max_url_length", str(int(cfg.ingest.max_url_length)))
    con.execute(script)
    stage = _sql_str(ctx.spec.name)
    con.execute(f"COPY (SELECT uid, url, caption, source FROM fated WHERE reason IS NULL) "
                f"TO '{ctx.kept_path}' (FORMAT parquet)")
    reject_rows = " UNION ALL ".join(
        f"SELECT md5(file_path || ':' || line) AS uid, {stage} AS stage, "
        f"'unreadable_row' AS reason, file_path || ':' || line || ': ' || error_message "
        f"AS detail FROM {t} JOIN {t}_scan USING (scan_id)"
        for t in rejects
    )
    # A rejected line can be reported once per bad column: one ledger row per line.
    unreadable = (f" UNION ALL SELECT uid, stage, reason, any_value(detail) FROM "
                  f"({reject_rows}) GROUP BY ALL") if rejects else ""
    con.execute(
        f"COPY (SELECT uid, {stage} AS stage, reason, "
        f"CASE reason WHEN 'exact_repeat' THEN 'same url and caption as an earlier row' "
        f"ELSE coalesce(url, '') END || ' (' || file || ')' AS detail "
        f"FROM fated WHERE reason IS NOT NULL{unreadable}) "
        f"TO '{ctx.dropped_path}' (FORMAT parquet)")
    n_unreadable = con.execute(
        f"SELECT count(*) FROM read_parquet('{ctx.dropped_path}') "
        "WHERE reason = 'unreadable_row'").fetchall()[0][0]
    by_source = dict(con.execute(
        f"SELECT source, count(*) FROM read_parquet('{ctx.kept_path}') GROUP BY 1 ORDER BY 1"
    ).fetchall())
    return {"rows_in": rows_read + n_unreadable, "kept_by_source": by_source,
            "captions_repaired_by_ftfy": repaired,
            "files": len(source_files(cfg))}
