"""Near pairs of 64-bit hashes as DuckDB joins (multi-index hashing), and their clusters.

Cut the 64 bits into B disjoint blocks. Two hashes within Hamming distance k differ in at
most k blocks, so they agree exactly on at least B − k of them (pigeonhole). One equi-join
per choice of B − k blocks ("table": C(B, k) of them) therefore finds every pair within k;
the exact distance then filters the candidates. More blocks mean more tables (rows scanned)
but wider keys (fewer random candidates): at 1M hashes and k = 4, B = 5 (five 13-bit keys)
yields ~3.5·10⁸ candidates, B = 6 (fifteen 21-bit keys) ~3·10⁶. ``blocks=0`` picks B from the
row counts with a cost model measured on this machine's DuckDB joins (see ``auto_blocks``).
With B ≤ k each table is one block (the old banded LSH): faster, but pairs can be missed.

Hot buckets. Real pHashes are not uniform: logos, blank and near-blank images put thousands
to millions of rows on one key, and a bucket of n rows makes n²/2 candidates. So, per table,
a bucket holding more than ``max_bucket`` rows (on both sides) is capped: only pairs with one
of its ``max_bucket`` smallest ids ("representatives") are candidates, n·max_bucket instead of
n²/2. A dense cluster stays whole (its members all meet the same representatives, so they
connect through them); a pair of two non-representatives is missed only if every table key
they share is capped. Hot keys are found from every 64th id first (ids must be integers),
then counted exactly; a bucket just over the cap may escape the sample and run uncapped.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

_SQL_DIR = Path(__file__).parent / "sql"
DEFAULT_MAX_BUCKET = 1000
_SAMPLE_EVERY = 64  # hot-key detection looks at ids ≡ 0 mod this first
# Measured on DuckDB 2.0, 2 threads, 10M rows: ~0.2 µs per row scanned per table, ~0.1 µs
# per candidate pair; the auto choice minimises rows + candidates / 2 (see bench_lsh).
_CANDIDATE_COST = 0.5


def _sql(name: str) -> list[str]:
    """The statements of a .sql file, without their comment lines (which name parameters)."""
    text = (_SQL_DIR / name).read_text()
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("--"))
    return [s.strip() for s in code.split(";\n") if s.strip()]


def _run(con: duckdb.DuckDBPyConnection, stmts: list[str], params: dict[str, Any]) -> None:
    for stmt in stmts:  # DuckDB rejects named parameters a statement does not use
        used = set(re.findall(r"\$(\w+)", stmt))
        con.execute(stmt, {k: v for k, v in params.items() if k in used})


def default_bands(max_distance: int) -> int:
    """k + 1 blocks: one-block tables, the fewest tables that still find every pair ≤ k."""
    return min(64, max_distance + 1)


def band_layout(bands: int) -> list[tuple[int, int, int]]:
    """(block, shift, mask) for ``bands`` disjoint bit ranges covering the 64 bits evenly."""
    if not 1 <= bands <= 64:
        raise ValueError(f"LSH bands must be between 1 and 64, got {bands}")
    out, shift = [], 0
    for i in range(bands):
        width = 64 // bands + (1 if i < 64 % bands else 0)
        out.append((i, shift, (1 << width) - 1))
        shift += width
    return out


def table_masks(blocks: int, max_distance: int) -> list[int]:
    """One 64-bit mask per table: the OR of its B − k blocks (one block each when B ≤ k)."""
    layout = [m << s for _, s, m in band_layout(blocks)]
    per_table = max(1, blocks - max_distance)
    return [sum(c) for c in itertools.combinations(layout, per_table)]


def _estimated_cost(blocks: int, k: int, n_left: int, n_right: int, self_join: bool) -> float:
    tables = math.comb(blocks, max(1, blocks - k))
    bits = 64 * max(1, blocks - k) / blocks
    pairs = n_left * (n_left - 1) / 2 if self_join else n_left * n_right
    return tables * (n_left + n_right + _CANDIDATE_COST * pairs * 2.0 ** -bits)


def auto_blocks(max_distance: int, n_left: int, n_right: int | None = None) -> int:
    """The block count in k+1 … k+4 with the lowest estimated cost, assuming uniform hashes
    (rows scanned per table, plus random candidates); every choice finds every pair ≤ k."""
    k = max_distance
    choices = range(k + 1, min(64, k + 4) + 1)
    if not choices:
        return 64
    right, self_join = (n_left, True) if n_right is None else (n_right, False)
    return min(choices, key=lambda b: _estimated_cost(b, k, n_left, right, self_join))


def near_pairs(con: duckdb.DuckDBPyConnection, left: str, right: str | None, max_distance: int,
               bands: int, out: str, max_bucket: int = DEFAULT_MAX_BUCKET,
               stats: dict[str, Any] | None = None, count_candidates: bool = False) -> int:
    """Create table ``out(a, b, distance)`` of id pairs within ``max_distance``; return its size.

    ``left``/``right`` are SQL relations (table names or subqueries) with columns id (integer)
    and h (UBIGINT). ``right=None`` pairs ``left`` with itself, each unordered pair once
    (a < b). ``bands`` = blocks B (0 = ``auto_blocks``); recall is complete when B > k and
    no bucket exceeded ``max_bucket`` (0 = no cap). ``stats``, if given, receives the blocks,
    tables, hot buckets capped and their rows, and (``count_candidates``, which costs one
    more join per table) the candidate pairs the joins generated.
    """
    self_join = right is None
    con.execute(f"CREATE OR REPLACE TEMP VIEW lsh_left AS SELECT id, h::UBIGINT AS h FROM {left}")
    con.execute(f"CREATE OR REPLACE TEMP VIEW lsh_right AS SELECT id, h::UBIGINT AS h "
                f"FROM {right or left}")
    n_left = con.execute("SELECT count(*) FROM lsh_left").fetchall()[0][0]
    n_right = n_left if self_join else con.execute(
        "SELECT count(*) FROM lsh_right").fetchall()[0][0]
    blocks = bands or auto_blocks(max_distance, n_left, None if self_join else n_right)
    masks = table_masks(blocks, max_distance)
    started = time.perf_counter()
    con.execute("CREATE OR REPLACE TEMP TABLE lsh_found AS SELECT a.id AS a, b.id AS b, "
                "0::INTEGER AS distance FROM lsh_left a, lsh_right b WHERE false")
    st: dict[str, Any] = {"blocks": blocks, "tables": len(masks), "hot_buckets": 0,
                          "hot_rows": 0, "largest_hot_bucket": 0, "candidates_capped_away": 0}
    candidates = 0
    for mask in masks:
        p = {"m": mask, "k": max_distance, "self": self_join, "cap": max_bucket,
             "every": _SAMPLE_EVERY, "hits": max(2, math.ceil(max_bucket / _SAMPLE_EVERY / 2))}
        hot: list[tuple[int, int]] = []
        if max_bucket:
            _run(con, _sql("lsh_flag.sql"), p)
            if con.execute("SELECT count(*) FROM lsh_flag").fetchall()[0][0]:
                _run(con, _sql("lsh_hot.sql"), p)
                hot = [(int(a), int(b)) for a, b in con.execute(
                    "SELECT n_left, n_right FROM lsh_hot").fetchall()]
        # the plain join skips capped keys; without any, it reads the inputs unfiltered
        where = f" WHERE (h & {mask}::UBIGINT) NOT IN (SELECT v FROM lsh_hot)" if hot else ""
        con.execute(f"CREATE OR REPLACE TEMP VIEW lsh_l AS SELECT id, h FROM lsh_left{where}")
        con.execute(f"CREATE OR REPLACE TEMP VIEW lsh_r AS SELECT id, h FROM lsh_right{where}")
        _run(con, _sql("lsh_pairs.sql"), p)
        if hot:
            _run(con, _sql("lsh_hot_pairs.sql"), p)
            st["hot_buckets"] += len(hot)
            st["hot_rows"] += sum(n for n, _ in hot)
            st["largest_hot_bucket"] = max(st["largest_hot_bucket"], *(n for n, _ in hot))
            for nl, nr in hot:
                full = nl * (nl - 1) // 2 if self_join else nl * nr
                st["candidates_capped_away"] += full - _capped_candidates(nl, nr, max_bucket,
                                                                          self_join)
        if count_candidates:
            candidates += con.execute(_sql("lsh_count.sql")[0],
                                      {"m": mask, "self": self_join}).fetchall()[0][0]
            candidates += sum(_capped_candidates(nl, nr, max_bucket, self_join) for nl, nr in hot)
    con.execute(f"CREATE OR REPLACE TEMP TABLE {out} AS SELECT a, b, min(distance) AS distance "
                "FROM lsh_found GROUP BY a, b")
    st["pairs"] = con.execute(f"SELECT count(*) FROM {out}").fetchall()[0][0]
    st["recall_complete"] = blocks > max_distance and st["hot_buckets"] == 0
    st["seconds"] = round(time.perf_counter() - started, 3)
    if count_candidates:
        st["candidates"] = candidates
    if stats is not None:
        stats.update(st)
    return st["pairs"]


def _capped_candidates(n_left: int, n_right: int, cap: int, self_join: bool) -> int:
    """Pairs a capped bucket still compares: those with a representative on either side."""
    if self_join:
        return cap * (cap - 1) // 2 + cap * (n_left - cap)
    return cap * n_left + cap * n_right - cap * cap


def components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of an undirected graph given as edge arrays of integer ids.

    Returns (node ids, root) where root is the smallest id in the node's component, so the
    result depends only on the edges, not on their order. Min-label propagation with pointer
    jumping, vectorised in numpy.
    """
    if len(a) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    nodes, inv = np.unique(np.concatenate([a, b]).astype(np.int64), return_inverse=True)
    ea, eb = inv[: len(a)], inv[len(a):]
    label = np.arange(len(nodes))
    while True:
        prev = label.copy()
        m = np.minimum(label[ea], label[eb])
        np.minimum.at(label, ea, m)
        np.minimum.at(label, eb, m)
        while True:  # pointer jumping: follow labels to their own label until stable
            nxt = label[label]
            if np.array_equal(nxt, label):
                break
            label = nxt
        if np.array_equal(label, prev):
            break
    # nodes are sorted, so the smallest position is the smallest id
    return nodes, nodes[label]
