"""Banded LSH over 64-bit hashes as a DuckDB join, and deterministic clusters of the pairs."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np

_SQL = (Path(__file__).parent / "sql" / "lsh_pairs.sql").read_text()


def default_bands(max_distance: int) -> int:
    """b = k + 1 bands: the widest bands (fewest candidates) that still find every pair ≤ k."""
    return min(64, max_distance + 1)


def band_layout(bands: int) -> list[tuple[int, int, int]]:
    """(band, shift, mask) for ``bands`` disjoint bit ranges covering the 64 bits evenly."""
    if not 1 <= bands <= 64:
        raise ValueError(f"LSH bands must be between 1 and 64, got {bands}")
    out, shift = [], 0
    for i in range(bands):
        width = 64 // bands + (1 if i < 64 % bands else 0)
        out.append((i, shift, (1 << width) - 1))
        shift += width
    return out


def near_pairs(con: duckdb.DuckDBPyConnection, left: str, right: str | None, max_distance: int,
               bands: int, out: str) -> int:
    """Create table ``out(a, b, distance)`` of id pairs within ``max_distance``.

    ``left``/``right`` are SQL relations (table names or subqueries) with columns id and h
    (UBIGINT). ``right=None`` pairs ``left`` with itself, each unordered pair once (a < b).
    Recall is complete for distances < bands; with fewer bands some pairs may be missed.
    """
    con.execute(f"CREATE OR REPLACE TEMP VIEW lsh_left AS SELECT id, h::UBIGINT AS h FROM {left}")
    con.execute(f"CREATE OR REPLACE TEMP VIEW lsh_right AS SELECT id, h::UBIGINT AS h "
                f"FROM {right or left}")
    con.execute("CREATE OR REPLACE TEMP TABLE lsh_bands (band INTEGER, shift INTEGER, "
                "mask UBIGINT)")
    con.executemany("INSERT INTO lsh_bands VALUES (?, ?, ?)", band_layout(bands))
    con.execute(f"CREATE OR REPLACE TEMP TABLE {out} AS {_SQL}",
                {"k": max_distance, "self": right is None})
    return con.execute(f"SELECT count(*) FROM {out}").fetchall()[0][0]


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
