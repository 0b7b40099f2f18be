"""The inputs of `witforge plan`'s calibration runs: a tiny sample of ingest's sources
(``short_sources``; the row stages' samples are a query in pipeline/plan_measure.py), and
for a small pilot a second point, its own input repeated to ~GROWN_ROWS rows.

A 1k-row pilot spends a few hundredths of a second per stage on its rows and a few tenths
on start-up: the per-row part is a difference of two noisy times, below the noise of a
fresh process. The per-row cost is what 400M rows multiply, so `witforge plan` measures it
on more rows of the same kind: the stage runs once more on its pilot input repeated
``copies`` times. Each copy is made distinct the way the stage tells rows apart, so that
copies never repeat one another and each copy holds the pilot's own duplicates and no more:

* ingest (its uid is md5(url, caption)): in copy k every URL's host gets the prefix
  ``c<k>.`` (the line's bytes otherwise untouched, so a TSV's mojibake, quoting and bad
  lines stay as they were);
* url_dedup (url + caption pairs): the same host prefix, and a uid suffix;
* every other row stage: the uid gets the suffix ``~<k>``.

The repeated input stays under one DuckDB row group (122,880 rows), so the stage runs on
the one thread a small pilot ran on, and the per-row cost is the pilot's, not a
multi-threaded one (pipeline/plan_model.py scales threads separately).
"""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path
from typing import Any

import duckdb

from pipeline.stage import StageError

GROWN_ROWS = 100_000  # under one row group (pipeline/plan_model.py: ROW_GROUP_ROWS)
MIN_COPIES = 4  # a pilot that would be repeated fewer times measures its per-row cost itself
HOST_MARK = b"://"  # the prefix goes right after the scheme


def copies_for(rows: int) -> int:
    """How many copies of a ``rows``-row input make about GROWN_ROWS (0: not worth it)."""
    n = GROWN_ROWS // max(rows, 1)
    return n if n >= MIN_COPIES else 0


def _host_prefix_sql(col: str, k: str) -> str:
    return f"replace({col}, '://', '://c' || {k} || '.')"


def grown_rows_query(kept: str, stage: str, copies: int) -> str:
    """The SELECT of ``copies`` distinct copies of the rows of relation ``kept``."""
    uid = "uid || '~' || k"
    repl = f"{uid} AS uid"
    if stage == "url_dedup":
        repl += f", {_host_prefix_sql('url', 'k')} AS url"
    return f"SELECT p.* REPLACE ({repl}) FROM {kept} p, range({copies}) t(k)"


def short_sources(files: list[tuple[Any, Any, Path]], out: Path, n: int,
                  con: duckdb.DuckDBPyConnection) -> list[Any]:
    """The calibration's tiny sample of ingest's sources: each source file's first rows, in
    its own format (gzip dropped: the name says so)."""
    from pipeline.ingest_sources import detect_format

    out.mkdir(parents=True)
    per_file = max(1, n // len(files))
    sources = []
    for k, (_, src, path) in enumerate(files):
        fmt = detect_format(path, src.format)
        name = path.name.removesuffix(".gz").removesuffix(".GZ")
        dst = out / f"{k:03d}_{name}"
        if fmt == "parquet":
            con.execute(f"COPY (SELECT * FROM read_parquet('{path}') LIMIT {per_file}) "
                        f"TO '{dst}' (FORMAT parquet)")
        elif fmt in ("csv", "tsv", "jsonl"):
            opener: Any = gzip.open if path.name.lower().endswith(".gz") else open
            keep = per_file + (1 if fmt in ("csv", "tsv") and src.header else 0)
            with opener(path, "rb") as f, open(dst, "wb") as h:
                for i, line in enumerate(f):
                    if i >= keep:
                        break
                    h.write(line)
        else:
            raise StageError(f"{path}: a {fmt} source cannot be cut short line by line")
        sources.append(dataclasses.replace(src, path=str(dst), format=fmt,
                                           tag=src.tag or path.name.split(".")[0]))
    return sources


def grown_sources(files: list[tuple[Any, Any, Path]], out: Path, copies: int,
                  con: duckdb.DuckDBPyConnection) -> list[Any]:
    """Every source file ``copies`` times over in one file of its own format (``files``:
    ingest's (_, Source, path) list), copy k with its URLs' hosts prefixed ``c<k>.``."""
    from pipeline.ingest_sources import detect_format

    out.mkdir(parents=True)
    sources = []
    for i, (_, src, path) in enumerate(files):
        fmt = detect_format(path, src.format)
        dst = out / f"{i:03d}_{path.name}"
        if fmt == "parquet":
            col = '"' + src.url_col.replace('"', '""') + '"'
            con.execute(f"COPY (SELECT p.* REPLACE ({_host_prefix_sql(col, 'k')} AS {col}) "
                        f"FROM read_parquet('{path}') p, range({copies}) t(k)) "
                        f"TO '{dst}' (FORMAT parquet)")
        elif fmt in ("csv", "tsv", "jsonl"):
            _repeat_lines(path, dst, copies, header=fmt in ("csv", "tsv") and src.header)
        else:
            raise StageError(f"{path}: a {fmt} source cannot be repeated line by line")
        sources.append(dataclasses.replace(src, path=str(dst), format=fmt,
                                           tag=src.tag or path.name.split(".")[0]))
    return sources


def _repeat_lines(path: Path, dst: Path, copies: int, header: bool) -> None:
    gz = path.name.lower().endswith(".gz")
    opener: Any = gzip.open if gz else open
    with opener(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    if lines and not lines[-1].endswith(b"\n"):
        lines[-1] += b"\n"
    head, body = (lines[:1], lines[1:]) if header else ([], lines)
    with opener(dst, "wb") as g:
        g.writelines(head)
        for k in range(copies):
            mark = b"://c%d." % k
            g.writelines(line.replace(HOST_MARK, mark) for line in body)


def fit_grown(pilot_rows: int, pilot_total: float, grown: dict[str, Any], key: str,
              per_key: float = 0.0, grown_per_key: float = 0.0) -> tuple[float, float] | None:
    """(fixed, per row) from the pilot and its grown run: the per-row cost over the span
    between them. ``per_key``: seconds of the total spent once per distinct key (ingest's
    ftfy per distinct caption, repeated copies add none), left out of the span and counted
    per pilot row, as the rest of the planner expects."""
    n, t = int(grown.get("rows") or 0), grown.get(key)
    if t is None or n <= pilot_rows or not pilot_rows:
        return None
    slope = max(0.0, ((float(t) - grown_per_key) - (pilot_total - per_key)) / (n - pilot_rows))
    per_row = slope + per_key / pilot_rows
    fixed = max(0.0, min(pilot_total, pilot_total - per_row * pilot_rows))
    return fixed, per_row
