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

Steps (``dedup/sql/url_*.sql``): a 64-bit hash per row, streamed to Parquet; the rows whose
hash repeats (the candidates) with their strings; then the exact (canonical url, caption)
comparison, so a hash collision never drops a pair. When the candidates' strings would not
fit half of ``duckdb.memory_limit`` they are written once to Parquet, split by hash into
parts that do, and compared one part at a time: the strings of 100M rows' candidates never
spill. The report says ``candidates`` and ``compare_parts``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import duckdb

from pipeline import parts
from pipeline.progress import progress
from pipeline.stage import StageContext, StageError, memory_limit_bytes

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


def candidate_parts(ctx: StageContext, con: duckdb.DuckDBPyConnection, candidates: int) -> int:
    """In how many hash parts the exact comparison of ``candidates`` rows fits the memory
    limit: each row holds its uid, url (as canonical url) and caption twice over, once in
    the aggregate and once in the join back to it."""
    per_row = 2 * parts.bytes_per_row(ctx.input_path, ["uid", "url", "caption"])
    return parts.part_count(candidates, per_row, memory_limit_bytes(con))


def run(ctx: StageContext) -> dict[str, Any]:
    if ctx.input_path is None:
        raise StageError("url_dedup needs an upstream stage")
    con = ctx.connect()
    steps = progress(total=3, desc="url_dedup: key, compare, write", unit="step")
    source = f"read_parquet({_str(str(ctx.input_path))}, file_row_number = true)"
    # scratch files in the stage's temporary folder, removed below: it holds the outputs
    keys, cand_dir = ctx.out_dir / "_url_keys.parquet", ctx.out_dir / "_url_candidates"
    script = (SQL_DIR / "url_keys.sql").read_text().format(
        canonical=canonical_sql(source, ctx.cfg.url_dedup.strip_params), keys=_str(str(keys)))
    con.execute("CREATE OR REPLACE TEMP TABLE url_dups (rn BIGINT, uid VARCHAR, keeper VARCHAR)")
    try:
        con.execute(script)
        candidates = int(con.execute("SELECT coalesce(sum(n), 0) FROM url_repeated"
                                     ).fetchall()[0][0])
        # `witforge plan`'s calibration sets compare_parts to time the split on a pilot
        n_parts = int(ctx.options.get("compare_parts") or candidate_parts(ctx, con, candidates))
        steps.update()
        select = (SQL_DIR / "url_candidates.sql").read_text().format(
            input=_str(str(ctx.input_path)), parts=n_parts)
        compare = (SQL_DIR / "url_compare.sql").read_text()
        if candidates and n_parts == 1:  # fits: no need to write the strings out first
            con.execute(compare.format(candidates=select))
        elif candidates:
            con.execute(f"COPY ({select}) TO {_str(str(cand_dir))} "
                        "(FORMAT parquet, PARTITION_BY (part))")
            files = _str(str(cand_dir / "*" / "*.parquet"))
            for part in range(n_parts):
                con.execute(compare.format(candidates=(
                    f"SELECT * EXCLUDE (part) FROM read_parquet({files}, "
                    f"hive_partitioning = true) WHERE part = {part}")))
    except duckdb.Error as e:
        raise StageError(f"url_dedup on {ctx.input_path}: {str(e).splitlines()[0]}") from e
    steps.update()
    con.execute(f"COPY (SELECT uid, {_str(ctx.spec.name)} AS stage, '{REASON}' AS reason, "
                f"keeper AS detail FROM url_dups) TO '{ctx.dropped_path}' (FORMAT parquet)")
    con.execute(f"COPY (SELECT * EXCLUDE (file_row_number) FROM {source} "
                f"ANTI JOIN url_dups ON file_row_number = rn) TO '{ctx.kept_path}' "
                "(FORMAT parquet)")
    steps.update()
    steps.close()
    keys.unlink()
    shutil.rmtree(cand_dir, ignore_errors=True)
    groups = con.execute("SELECT count(DISTINCT keeper) FROM url_dups").fetchall()[0][0]
    return {"duplicate_groups": groups, "candidates": candidates, "compare_parts": n_parts}
