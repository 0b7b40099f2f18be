"""Named SQL filters: ``text_filter`` (before the crawl), ``image_filter`` (after it) and
``clip_filter`` (over the embed stage's ``clip_score``; a drop's detail carries the score).

A filter is a ``.sql`` file; its name is the file name without ``.sql``. It holds either

- a **condition**: a boolean SQL expression over the columns of one pair, TRUE = keep
  (``length(caption) > 5``); or
- a **query**: a full statement starting with ``SELECT``, ``WITH`` or ``FROM`` that reads
  table ``pairs`` and returns a column ``uid``: the uids to keep. Use it when a condition is
  not enough (a row's fate depends on other rows). It sees every input row of the stage,
  not only the survivors of earlier filters, so its answer does not depend on list order.

A build lists filters in ``text_filter.filters`` / ``image_filter.filters``: a bare name is
a shipped filter (``pipeline/sql/filters/``); an entry ending in ``.sql`` or holding a ``/``
is a path relative to the build file. Every other key of the section is visible to the
SQL as ``getvariable('<key>')``.

Filters run in order on a sandboxed DuckDB connection (``pipeline.sandbox``). A row is
dropped by the first filter that does not return TRUE: ``reason`` = that filter's name,
``detail`` = ``'false'``, or ``'null'`` when the condition was NULL (NULL drops: a filter
that cannot say yes does not keep a row). Later filters never see a dropped row, so each
row is kept or dropped exactly once, and an expensive filter listed last (``english``)
only runs on the rows the cheap ones kept.

A condition that reads only its own row (no SELECT, FROM, OVER or ``pairs`` in it) gives the
same answer on any slice of the input, so when every filter is one, the stage loads the input
in parts of at most half the memory limit, each into a sandbox of its own: at 100M rows the
whole caption column would not fit and would spill. A query filter, or a condition with a
subquery or a window, sees the whole input in one part.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import parts
from pipeline.config import BuildConfig, ConfigError, load_build
from pipeline.progress import progress
from pipeline.sandbox import is_permission_error, open_sandbox
from pipeline.stage import (
    StageContext,
    StageError,
    StageSpec,
    get_spec,
    kept_of,
    memory_limit_bytes,
    previous_stage,
    stage_dir,
)

FILTER_DIR = Path(__file__).parent / "sql" / "filters"
FILTER_STAGES = ("text_filter", "image_filter", "clip_filter")
# Columns whose value a dropped row records in its detail, per stage: a clip filter's drop says
# the score that failed ('false; clip_score=0.2134').
DETAIL_COLUMNS = {"clip_filter": ("clip_score",)}
# A query starts with one of these words; anything else (even "(SELECT …) > 0") is a condition.
_QUERY_START = re.compile(r"^(select|with|from)\b", re.IGNORECASE)
_LEADING_COMMENTS = re.compile(r"^(?:\s+|--[^\n]*|/\*.*?\*/)*", re.DOTALL)
# Words by which a condition reaches beyond its own row (a subquery, a window).
_BEYOND_ROW = re.compile(r"\b(select|from|over|pairs)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Filter:
    name: str
    path: Path
    sql: str  # the file's text; a query's without a trailing ';'
    is_query: bool

    @property
    def description(self) -> str:
        """The filter file's leading comment lines."""
        lines = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.startswith("--"):
                break
            lines.append(line[2:].strip())
        return " ".join(lines)


def shipped_filters() -> list[str]:
    return sorted(p.stem for p in FILTER_DIR.glob("*.sql"))


def load_filter(path: Path, name: str | None = None) -> Filter:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"filter {path}: cannot read it: {e}") from e
    body = _LEADING_COMMENTS.sub("", text, count=1).strip()
    if not body:
        raise ConfigError(f"filter {path}: holds no SQL")
    is_query = bool(_QUERY_START.match(body))
    if is_query:
        # DuckDB's parser splits statements (comments and a trailing ';' go); a filter
        # holding several statements is refused when it is checked.
        try:
            stmts = duckdb.extract_statements(text)
        except duckdb.Error as e:
            raise ConfigError(f"filter {path}: not valid SQL: {str(e).splitlines()[0]}") from e
        if len(stmts) != 1 or stmts[0].type != duckdb.StatementType.SELECT:
            raise ConfigError(f"filter {path}: a query filter must be exactly one SELECT "
                              f"statement (found {len(stmts)} statements)")
        text = stmts[0].query.rstrip()
        text = text[:-1] if text.endswith(";") else text
    return Filter(name or path.stem, path, text, is_query)


def resolve_filter(cfg: BuildConfig | None, entry: str) -> Filter:
    """A list entry → its file: bare names are shipped, paths are relative to the build."""
    if entry.endswith(".sql") or "/" in entry or "\\" in entry:
        path = cfg.resolve(entry) if cfg is not None else Path(entry)
        if not path.is_file():
            raise ConfigError(f"filter {entry}: no such file {path}")
        return load_filter(path)
    path = FILTER_DIR / f"{entry}.sql"
    if not path.is_file():
        raise ConfigError(f"filter {entry!r} is not a shipped filter (shipped: "
                          f"{', '.join(shipped_filters())}); name a file as path/to/name.sql")
    return load_filter(path)


def filters_of(cfg: BuildConfig, section: str) -> list[Filter]:
    out = [resolve_filter(cfg, e) for e in getattr(cfg, section).filters]
    seen: dict[str, Path] = {}
    for f in out:
        if f.name in seen:
            raise ConfigError(f"{cfg.path}: {section}.filters: two filters named {f.name!r} "
                              f"({seen[f.name]} and {f.path}); names must be unique")
        seen[f.name] = f.path
    return out


def variables_of(cfg: BuildConfig, section: str) -> dict[str, Any]:
    return {k: v for k, v in cfg.section(section).items() if k != "filters"}


def fingerprint_inputs(cfg: BuildConfig, spec: StageSpec) -> dict[str, Any]:
    try:
        return {f.name: hashlib.sha256(f.path.read_bytes()).hexdigest()[:16]
                for f in filters_of(cfg, spec.name)}
    except ConfigError as e:
        return {"error": str(e)}  # run() raises it properly


def _keep_expr(f: Filter, i: int) -> str:
    """A boolean SQL expression over table pairs: TRUE = this filter keeps the row."""
    if f.is_query:
        return f"uid IN (SELECT uid FROM _keep_{i})"
    # newlines keep a trailing '--' comment in the condition from eating the rest
    return f"(\n{f.sql}\n)"


def _where(f: Filter) -> str:
    return f"filter {f.name} ({f.path})"


def _check(con: duckdb.DuckDBPyConnection, f: Filter, i: int) -> None:
    """Bind the filter alone: a bad column, a refused file access or a non-boolean
    condition fails here with the filter's name, before anything runs."""
    try:
        if f.is_query:
            cols = con.execute(f"DESCRIBE {f.sql}").fetchall()
            if "uid" not in [c[0] for c in cols]:
                raise StageError(f"{_where(f)}: a query filter must return a column uid "
                                 f"(it returns {', '.join(c[0] for c in cols)})")
            con.execute(f"CREATE TEMP TABLE _keep_{i} AS SELECT DISTINCT uid FROM (\n{f.sql}\n)")
            return
        probe = f"SELECT {_keep_expr(f, i)} AS keep FROM pairs"
        if len(con.extract_statements(probe)) != 1:
            raise StageError(f"{_where(f)}: a condition must be one expression, not statements")
        kind = con.execute(f"DESCRIBE {probe}").fetchall()[0][1]
        if kind != "BOOLEAN":
            raise StageError(f"{_where(f)}: the condition is {kind}, expected BOOLEAN "
                             "(TRUE = keep)")
    except duckdb.Error as e:
        raise _error(f, e) from None


def _error(f: Filter, e: duckdb.Error) -> StageError:
    msg = str(e).splitlines()[0]
    if is_permission_error(e):
        return StageError(f"{_where(f)}: refused by the sandbox — filters cannot read or write "
                          f"files, reach the network or load extensions: {msg}")
    return StageError(f"{_where(f)}: {msg}")


def fate_sql(filters: list[Filter]) -> str:
    """One pass over pairs: the 1-based index of the first failing filter, negative when
    its condition was NULL, NULL when every filter keeps the row. Nested CASEs evaluate a
    filter only on the rows that passed the ones before it."""
    expr = "NULL::INTEGER"
    for i in range(len(filters), 0, -1):
        expr = (f"CASE {_keep_expr(filters[i - 1], i)} WHEN true THEN {expr} "
                f"WHEN false THEN {i} ELSE {-i} END")
    return expr


def _drop_table(con: duckdb.DuckDBPyConnection, filters: list[Filter],
                stage: str) -> pa.Table:
    names = "[" + ", ".join("'" + f.name.replace("'", "''") + "'" for f in filters) + "]"
    have = {r[0] for r in con.execute("DESCRIBE pairs").fetchall()}
    keys = ", ".join(k for k in ("uid", "_row") if k in have)
    shown = [c for c in DETAIL_COLUMNS.get(stage, ()) if c in have]
    detail = "CASE WHEN fate < 0 THEN 'null' ELSE 'false' END"
    for c in shown:
        detail += f" || '; {c}=' || coalesce(printf('%.4f', {c}), 'NULL')"
    extra = "".join(f", {c}" for c in shown)
    try:
        return con.sql(
            f"SELECT {keys}, '{stage}' AS stage, {names}[abs(fate)] AS reason, "
            f"{detail} AS detail "
            f"FROM (SELECT {keys}{extra}, {fate_sql(filters)} AS fate FROM pairs) "
            "WHERE fate IS NOT NULL").to_arrow_table()
    except duckdb.Error as e:
        # The combined query failed at run time (a cast, a UDF): find the filter that fails.
        for i, f in enumerate(filters, 1):
            try:
                con.execute(f"SELECT count(*) FROM pairs WHERE {_keep_expr(f, i)}").fetchall()
            except duckdb.Error as e2:
                raise _error(f, e2) from None
        raise StageError(f"{stage}: filters {', '.join(f.name for f in filters)}: "
                         f"{str(e).splitlines()[0]}") from None


def columns_needed(filters: list[Filter], columns: list[str]) -> list[str]:
    """The input columns the filters can refer to: a column whose name appears nowhere in
    their SQL cannot be read by it, so it is not loaded (uid, url and source are most of
    the bytes a caption filter would otherwise copy). ``*`` or COLUMNS(…) loads all."""
    text = _strip_literals("\n".join(f.sql for f in filters))
    if "*" in text or re.search(r"\bcolumns\s*\(", text, re.IGNORECASE):
        return list(columns)
    needed = [c for c in columns
              if re.search(rf"(?<![\w$]){re.escape(c)}(?![\w$])", text, re.IGNORECASE)]
    if any(f.is_query for f in filters) and "uid" in columns and "uid" not in needed:
        needed.append("uid")  # query filters return uids
    return needed


def _strip_literals(sql: str) -> str:
    """SQL without its string literals and comments (a '*' in a regex is no SELECT *)."""
    return re.sub(r"'(?:[^']|'')*'|--[^\n]*|/\*.*?\*/", " ", sql, flags=re.DOTALL)


def row_local(f: Filter) -> bool:
    """True when the filter's answer for a row depends on that row alone."""
    return not f.is_query and not _BEYOND_ROW.search(_strip_literals(f.sql))


def part_ranges(path: Path, filters: list[Filter], columns: list[str],
                memory_bytes: int | None) -> list[tuple[int, int]]:
    """Row ranges [start, end) of ``path`` to load one at a time: one range unless every
    filter is row-local and the columns they read exceed ``parts.PART_MEMORY_SHARE`` of
    ``memory_bytes`` (None: no limit)."""
    rows = pq.ParquetFile(path).metadata.num_rows
    step = parts.rows_per_part(parts.bytes_per_row(path, columns), memory_bytes)
    if not rows or step is None or not all(row_local(f) for f in filters):
        return [(0, rows)]
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def apply_filters(con: duckdb.DuckDBPyConnection, filters: list[Filter],
                  stage: str) -> pa.Table:
    """Check and run ``filters`` on table pairs of a sandbox; the dropped rows' ledger."""
    for i, f in enumerate(filters, 1):
        _check(con, f, i)
    return _drop_table(con, filters, stage)


def run(ctx: StageContext) -> dict[str, Any]:
    section = ctx.spec.name
    if section not in FILTER_STAGES:
        raise StageError(f"pipeline.filter serves {FILTER_STAGES}, not {section}")
    if ctx.input_path is None:
        raise StageError(f"{section} needs an upstream stage")
    filters = filters_of(ctx.cfg, section)
    if not filters:
        # nothing to do: the input passes through unchanged
        con = ctx.connect()
        con.execute(f"COPY (SELECT * FROM read_parquet('{ctx.input_path}')) "
                    f"TO '{ctx.kept_path}' (FORMAT parquet)")
        ctx.write_empty_dropped(con)
        return {"filters": []}
    names = pq.read_schema(ctx.input_path).names
    needed = columns_needed(filters, names)
    needed += [c for c in DETAIL_COLUMNS.get(section, ()) if c in names and c not in needed]
    # Both outputs are written by an ordinary connection straight from the input Parquet,
    # matched on row position: native Parquet writing, every input column carried forward,
    # and exactly one outcome per row even if a uid were repeated.
    con = ctx.connect()
    ranges = part_ranges(ctx.input_path, filters, needed, memory_limit_bytes(con))
    steps = progress(total=len(ranges) + 1, unit="step",
                     desc=f"{section}: filter {len(ranges)} part(s), write")
    dropped_parts = []
    for rows in ranges:
        sandbox = open_sandbox(ctx.cfg, {"pairs": ctx.input_path},
                               variables_of(ctx.cfg, section), columns={"pairs": needed},
                               rows=rows)
        dropped = apply_filters(sandbox, filters, section)
        dropped_parts.append(dropped.select(["_row", "reason", "detail"]))
        sandbox.close()
        steps.update()
    dropped = pa.concat_tables(dropped_parts)
    con.register("dropped_rows", dropped)
    source = f"read_parquet('{ctx.input_path}', file_row_number = true)"
    con.execute(f"COPY (SELECT i.uid::VARCHAR AS uid, '{section}' AS stage, d.reason, d.detail "
                f"FROM {source} i JOIN dropped_rows d ON i.file_row_number = d._row) "
                f"TO '{ctx.dropped_path}' (FORMAT parquet)")
    con.execute(f"COPY (SELECT * EXCLUDE (file_row_number) FROM {source} "
                f"ANTI JOIN dropped_rows d ON file_row_number = d._row) "
                f"TO '{ctx.kept_path}' (FORMAT parquet)")
    steps.update()
    steps.close()
    by_filter = {f.name: 0 for f in filters}
    for reason, count in zip(*_counts(dropped), strict=True):
        by_filter[reason] = count
    return {"filters": [f"{f.name} ({f.path})" for f in filters], "dropped_by_filter": by_filter,
            "parts": len(ranges)}


def _counts(dropped: pa.Table) -> tuple[list[str], list[int]]:
    vc = dropped.column("reason").combine_chunks().value_counts()
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()


# ---- witforge preview ---------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="witforge preview",
        description="Run one SQL filter on a build's data in the sandbox and show how many "
        "rows it keeps and drops, with examples of each. Writes nothing.",
    )
    p.add_argument("filter", help="a .sql file, or the name of a shipped filter "
                   f"({', '.join(shipped_filters())})")
    p.add_argument("--build", required=True, help="the build YAML")
    p.add_argument("--stage", choices=FILTER_STAGES, default="text_filter",
                   help="run on this stage's input (default text_filter: the ingested pairs; "
                   "image_filter: the crawled samples; clip_filter: the embedded pairs, with "
                   "clip_score)")
    p.add_argument("-n", type=int, default=5, help="examples of each outcome (default 5)")
    return p


def preview(cfg: BuildConfig, f: Filter, stage: str, n: int = 5) -> dict[str, Any]:
    """Counts and examples of what ``f`` keeps and drops on ``stage``'s input."""
    spec = get_spec(stage)
    prev = previous_stage(cfg, spec)
    if prev is None or not (stage_dir(cfg, prev) / "_SUCCESS").exists():
        name = prev.name if prev else "ingest"
        raise StageError(f"preview on {stage} needs stage {name} first: run `witforge {name} "
                         f"--build {cfg.path}`")
    con = open_sandbox(cfg, {"pairs": kept_of(cfg, prev.name)}, variables_of(cfg, stage))
    _check(con, f, 1)
    expr = _keep_expr(f, 1)
    try:
        rows, kept, false, null = con.execute(
            f"SELECT count(*), count(*) FILTER (k), count(*) FILTER (NOT k), "
            f"count(*) FILTER (k IS NULL) FROM (SELECT {expr} AS k FROM pairs)").fetchall()[0]
        cols = "uid, url, caption" if stage == "text_filter" else "*"
        examples = {
            outcome: con.execute(f"SELECT {cols} FROM pairs WHERE ({expr}) IS {outcome} "
                                 f"ORDER BY hash(uid) LIMIT {int(n)}").fetchall()
            for outcome in ("TRUE", "FALSE", "NULL")
        }
    except duckdb.Error as e:
        raise _error(f, e) from None
    return {"rows": rows, "kept": kept, "dropped_false": false, "dropped_null": null,
            "examples": examples, "input": str(kept_of(cfg, prev.name))}


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    cfg = load_build(args.build)
    f = resolve_filter(cfg, args.filter) if not Path(args.filter).is_file() else load_filter(
        Path(args.filter))
    r = preview(cfg, f, args.stage, args.n)
    pct = 100.0 * r["kept"] / r["rows"] if r["rows"] else 0.0
    print(f"filter {f.name} ({f.path}, {'query' if f.is_query else 'condition'}) on "
          f"{r['input']}:")
    print(f"  {r['rows']:,} rows: {r['kept']:,} kept ({pct:.1f} %), "
          f"{r['dropped_false']:,} dropped (false), {r['dropped_null']:,} dropped (NULL)")
    for outcome, label in (("TRUE", "kept"), ("FALSE", "dropped"), ("NULL", "dropped, NULL")):
        if r["examples"][outcome]:
            print(f"  examples {label}:")
            for row in r["examples"][outcome]:
                print("    " + " | ".join(str(v)[:100] for v in row))
    return 0
