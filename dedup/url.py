"""url_dedup: canonicalize URLs and drop repeated (canonical url, caption) pairs.

Canonical form (``dedup/sql/url_canonical.sql``): scheme and host lower-cased, default
ports (:80, :443) and fragments removed, an empty path made '/', the tracking parameters
listed in ``url_dedup.strip_params`` (case-insensitive) and empty parameters removed, and
an empty query's '?' dropped. Two rows with the same canonical URL and the same caption are
duplicates (cc2dataset's rule: the same image under another caption is another pair).

Survivor: in each group of duplicates the row with the shortest URL, then the smallest
uid, is kept; every other row is dropped with reason ``duplicate_url_caption`` and the
survivor's uid in ``detail``. Kept rows keep their original URL (the crawl fetches what
the manifest said) and every input column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb

from pipeline.progress import progress
from pipeline.stage import StageContext, StageError

SQL_DIR = Path(__file__).parent / "sql"
REASON = "duplicate_url_caption"


def _str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def strip_list(params: list[str]) -> str:
    """The SQL list literal of lower-cased parameter names."""
    return "[" + ", ".join(_str(p.lower()) for p in params) + "]::VARCHAR[]"


def canonical_sql(src: str, strip_params: list[str]) -> str:
    """A SELECT over relation ``src`` (with a column url) adding column canon (NULL where url
    is canonical already)."""
    return (SQL_DIR / "url_canonical.sql").read_text().format(
        src=src, strip=strip_list(strip_params))


def canonical_urls(con: duckdb.DuckDBPyConnection, urls: list[str],
                   strip_params: list[str]) -> list[str]:
    """Canonical forms of ``urls`` (for tests and tools; the stage works in SQL)."""
    src = "(SELECT u AS url, i FROM unnest(?) WITH ORDINALITY AS t(u, i))"
    return [r[0] for r in con.execute(
        f"SELECT coalesce(canon, url) FROM ({canonical_sql(src, strip_params)}) ORDER BY i",
        [urls]).fetchall()]


def run(ctx: StageContext) -> dict[str, Any]:
    if ctx.input_path is None:
        raise StageError("url_dedup needs an upstream stage")
    con = ctx.connect()
    steps = progress(total=3, desc="url_dedup: key, compare, write", unit="step")
    source = f"read_parquet({_str(str(ctx.input_path))}, file_row_number = true)"
    keys = ctx.out_dir / "_url_keys.parquet"  # removed below: the stage folder holds outputs
    script = (SQL_DIR / "url_dedup.sql").read_text().format(
        canonical=canonical_sql(source, ctx.cfg.url_dedup.strip_params),
        input=_str(str(ctx.input_path)), keys=_str(str(keys)))
    try:
        con.execute(script)
    except duckdb.Error as e:
        raise StageError(f"url_dedup on {ctx.input_path}: {str(e).splitlines()[0]}") from e
    steps.update(2)
    con.execute(f"COPY (SELECT uid, {_str(ctx.spec.name)} AS stage, '{REASON}' AS reason, "
                f"keeper AS detail FROM url_dups) TO '{ctx.dropped_path}' (FORMAT parquet)")
    con.execute(f"COPY (SELECT * EXCLUDE (file_row_number) FROM {source} "
                f"ANTI JOIN url_dups ON file_row_number = rn) TO '{ctx.kept_path}' "
                "(FORMAT parquet)")
    steps.update()
    steps.close()
    keys.unlink()
    groups = con.execute("SELECT count(DISTINCT keeper) FROM url_dups").fetchall()[0][0]
    return {"duplicate_groups": groups}
