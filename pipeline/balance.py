"""The balance stage: MetaCLIP metadata matching and balanced sampling, in DuckDB.

Serves two stages: ``precrawl_balance`` (a looser t before download, to save bandwidth) and
``balance`` (the final t after dedup, on the real counts); ``ctx.spec.name`` picks the config
section. Every entry's matches are counted over the whole pool; p(e) = min(1, t / count(e));
a pair is kept iff for some matched entry the seeded draw hash(uid, entry_id, seed) is below
p(e). Pairs without a match are dropped as ``no_metadata_match``, the others not drawn as
``balanced_out`` (detail: their rarest matched entry).

Writes, besides kept/dropped: ``matches/`` (uid, entry_id), ``entry_counts.parquet``
(entry_id, entry, count_before, count_after) and ``entry_counts.png`` (log-log).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from pipeline.config import BalanceConfig, BuildConfig
from pipeline.match import match_parquet, resolve_method
from pipeline.metadata import load_metadata
from pipeline.stage import StageContext, StageError, StageSpec

SQL = Path(__file__).parent / "sql"
HEAD = 10


def _sql(name: str) -> str:
    return (SQL / name).read_text()


def _section(cfg: BuildConfig, name: str) -> BalanceConfig:
    return cfg.precrawl_balance if name == "precrawl_balance" else cfg.balance


def fingerprint_inputs(cfg: BuildConfig, spec: StageSpec) -> dict[str, Any]:
    """The metadata file's content is an input: a new entry list reruns the stage."""
    b = _section(cfg, spec.name)
    p = cfg.resolve(b.metadata) if b.metadata else None
    if p is None or not p.is_file():
        return {"metadata": None}
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"metadata": h.hexdigest()}


def draw(uid: str, entry_id: int, seed: int) -> float:
    """The uniform draw the SQL computes, in Python (for tests and explanations)."""
    digest = hashlib.md5(f"{uid}\x1f{entry_id}\x1f{seed}".encode()).hexdigest()
    return int(digest[:13], 16) / float(1 << 52)


def expected_kept(con: duckdb.DuckDBPyConnection, t: int) -> float:
    """Expected kept pairs for cap t; needs count_sets (balance_counts.sql)."""
    return con.execute(_sql("balance_expected.sql"), {"t": float(t)}).fetchall()[0][0]


def choose_t(con: duckdb.DuckDBPyConnection, target: int) -> tuple[int, float]:
    """The t whose expected kept count is closest to target (expected_kept grows with t)."""
    max_n = con.execute("SELECT coalesce(max(n), 0) FROM entry_counts").fetchall()[0][0]
    if max_n == 0:
        return 1, 0.0
    lo, hi = 1, int(max_n)  # smallest t with expected >= target, or max_n if none
    while lo < hi:
        mid = (lo + hi) // 2
        if expected_kept(con, mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    best = (lo, expected_kept(con, lo))
    if lo > 1:
        below = expected_kept(con, lo - 1)
        if abs(below - target) <= abs(best[1] - target):
            best = (lo - 1, below)
    return best


def balance_matches(con: duckdb.DuckDBPyConnection, matches_glob: str, t: int, target: int,
                    seed: int) -> dict[str, Any]:
    """Count, choose t, and decide every matched uid into temp table ``decided``."""
    con.execute(f"CREATE OR REPLACE TEMP VIEW matches AS "
                f"SELECT uid, entry_id FROM read_parquet('{_lit(matches_glob)}')")
    for stmt in _sql("balance_counts.sql").split(";"):
        if stmt.strip():
            con.execute(stmt)
    if t > 0:
        expected = expected_kept(con, t)
        source = "config"
    else:
        t, expected = choose_t(con, target)
        source = f"target_size={target:,}"
    con.execute(_sql("balance_decide.sql"), {"t": t, "seed": seed})
    return {"t": t, "t_from": source, "expected_kept": round(expected, 1)}


def _lit(s: str | Path) -> str:
    return str(s).replace("'", "''")


def run(ctx: StageContext) -> dict[str, Any]:
    b = _section(ctx.cfg, ctx.spec.name)
    if ctx.input_path is None:
        raise StageError(f"stage {ctx.spec.name} needs an upstream kept.parquet")
    meta_path = ctx.cfg.resolve(b.metadata)
    try:
        entries = load_metadata(meta_path)
        method = resolve_method(b.method)
    except ValueError as e:
        raise StageError(f"{ctx.cfg.path}: {ctx.spec.name}.metadata: {e}") from e
    con = ctx.connect()
    src = _lit(ctx.input_path)
    match_dir = ctx.out_dir / "matches"
    shutil.rmtree(match_dir, ignore_errors=True)
    n_matches = match_parquet(con, ctx.input_path, entries, match_dir, method, b.workers)
    fig = balance_matches(con, str(match_dir / "*.parquet"), b.t, b.target_size, b.seed)
    print(f"[{ctx.spec.folder}] t = {fig['t']:,} ({fig['t_from']}): expected kept "
          f"{fig['expected_kept']:,.0f}")
    con.register("entries_arrow", entries)
    con.execute("CREATE TEMP TABLE entries AS SELECT * FROM entries_arrow")
    con.unregister("entries_arrow")
    con.execute(f"""COPY (SELECT p.* FROM read_parquet('{src}') p
                          SEMI JOIN (SELECT uid FROM decided WHERE keep) k USING (uid))
                    TO '{_lit(ctx.kept_path)}' (FORMAT parquet)""")
    stage = ctx.spec.name.replace("'", "")
    con.execute(f"""COPY (
        SELECT p.uid::VARCHAR AS uid, '{stage}' AS stage,
               CASE WHEN d.uid IS NULL THEN 'no_metadata_match' ELSE 'balanced_out' END AS reason,
               CASE WHEN d.uid IS NULL THEN ''
                    ELSE 'rarest entry ' || e.entry || ' (count ' || d.rarest.n::VARCHAR
                         || ', p=' || round({fig['t']} / d.rarest.n, 4)::VARCHAR || ')' END
                 AS detail
        FROM read_parquet('{src}') p
        LEFT JOIN decided d USING (uid)
        LEFT JOIN entries e ON e.entry_id = d.rarest.e
        WHERE d.keep IS NOT true
    ) TO '{_lit(ctx.dropped_path)}' (FORMAT parquet)""")
    counts = _entry_counts(con, ctx.out_dir / "entry_counts.parquet")
    kept = con.execute("SELECT count(*) FROM decided WHERE keep").fetchall()[0][0]
    report = {
        "method": method, "entries": entries.num_rows, "matches": n_matches,
        "matched_entries": counts.num_rows,
        "entries_over_t": sum(1 for n in counts.column("count_before").to_pylist()
                              if n > fig["t"]),
        **fig, "actual_kept": kept,
        "head": _rows(counts, HEAD, first=True), "tail": _rows(counts, HEAD, first=False),
    }
    plot_counts(counts, fig["t"], ctx.out_dir / "entry_counts.png", ctx.spec.name)
    report["plot"] = "entry_counts.png"
    return report


def _entry_counts(con: duckdb.DuckDBPyConnection, out: Path) -> pa.Table:
    q = """SELECT c.entry_id, e.entry, c.n AS count_before, coalesce(a.n, 0) AS count_after
           FROM entry_counts c JOIN entries e USING (entry_id)
           LEFT JOIN (SELECT m.entry_id, count(*) AS n FROM matches m
                      SEMI JOIN (SELECT uid FROM decided WHERE keep) k USING (uid)
                      GROUP BY m.entry_id) a USING (entry_id)
           ORDER BY count_before DESC, entry_id"""
    con.execute(f"COPY ({q}) TO '{_lit(out)}' (FORMAT parquet)")
    return con.sql(f"SELECT * FROM read_parquet('{_lit(out)}') "
                   "ORDER BY count_before DESC, entry_id").to_arrow_table()


def _rows(counts: pa.Table, k: int, first: bool) -> list[dict[str, Any]]:
    n = counts.num_rows
    part = counts.slice(0, k) if first else counts.slice(max(0, n - k), k)
    return [{"entry": r["entry"], "before": r["count_before"], "after": r["count_after"]}
            for r in part.to_pylist()]


def plot_counts(counts: pa.Table, t: int, out: Path, title: str) -> None:
    """Rank-count plot (log-log) of entry counts before and after balancing, with t."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = sorted((n for n in counts.column("count_before").to_pylist() if n > 0), reverse=True)
    after = sorted((n for n in counts.column("count_after").to_pylist() if n > 0), reverse=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if before:
        ax.plot(range(1, len(before) + 1), before, label="before", lw=1.5)
    if after:
        ax.plot(range(1, len(after) + 1), after, label="after", lw=1.5)
    ax.axhline(t, color="grey", ls="--", lw=1, label=f"t = {t:,}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("entry rank")
    ax.set_ylabel("matched pairs")
    ax.set_title(f"{title}: entry counts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
