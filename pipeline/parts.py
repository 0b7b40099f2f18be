"""Sizing a stage's work in parts that each fit DuckDB's memory limit.

A table or a hash aggregate whose strings outgrow ``duckdb.memory_limit`` spills to disk, and
at 100M rows that spill cost more than the work itself. A stage whose answer for a part
does not depend on the other parts (text_filter's row-local conditions; url_dedup's exact
comparison, split by hash) loads one part at a time instead. The size of a row is estimated
from the Parquet file's own metadata before anything is loaded.
"""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq

# A part holds at least this many rows (the fixed cost per part is ~10 ms).
MIN_PART_ROWS = 1_000_000
# A part's columns take at most this share of the memory limit: the work on them and the
# process itself need the rest.
PART_MEMORY_SHARE = 0.5
# DuckDB's in-memory row: a 16-byte string header per text column and an 8-byte row number.
ROW_OVERHEAD_BYTES = 24


def bytes_per_row(path: Path, columns: list[str]) -> float:
    """Estimated in-memory bytes of one row of ``columns`` of Parquet file ``path``: their
    uncompressed bytes per row plus DuckDB's per-column overhead (0 for an empty file)."""
    meta = pq.ParquetFile(path).metadata
    if not meta.num_rows:
        return 0.0
    wanted = set(columns)
    data = sum(meta.row_group(g).column(c).total_uncompressed_size
               for g in range(meta.num_row_groups) for c in range(meta.num_columns)
               if meta.row_group(g).column(c).path_in_schema in wanted)
    return data / meta.num_rows + ROW_OVERHEAD_BYTES * max(len(columns), 1)


def rows_per_part(per_row: float, memory_bytes: int | None) -> int | None:
    """How many rows of ``per_row`` bytes one part holds; None when there is no limit."""
    if memory_bytes is None or per_row <= 0:
        return None
    return max(MIN_PART_ROWS, int(memory_bytes * PART_MEMORY_SHARE / per_row))


def part_count(rows: int, per_row: float, memory_bytes: int | None) -> int:
    """How many parts ``rows`` rows of ``per_row`` bytes need (at least 1)."""
    step = rows_per_part(per_row, memory_bytes)
    return 1 if step is None or rows <= step else math.ceil(rows / step)
