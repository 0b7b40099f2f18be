"""MetaCLIP substring matching of captions against metadata entries, set-wise.

MetaCLIP's semantics (metaclip/substr_matching.py): pad the caption with a space on each side,
surround each of ``, . ; : ? !`` and the backtick with spaces, turn tab, newline and carriage
return into spaces; entry ``e`` matches iff ``" " + e + " "`` is a substring.

Why a token join is exact: the spaced caption S starts and ends with a space, so
``S.split(" ")`` is ``["", t1, ..., tk, ""]`` with no token containing a space (empty tokens
come from runs of spaces). ``" " + e + " "`` occurs in S iff ``e.split(" ")`` equals a
contiguous run of t1..tk, because each space of the pattern must land on a space of S. That
holds for entries with double spaces ("a  b" needs an empty token between a and b), leading or
trailing spaces, and punctuation (an entry "U.S." contains a bare "." and can never match,
since every "." in S is its own token). Entries with tab/newline/CR never match.

Two methods, same result (tests check both against a direct reference on adversarial input):
- ``ahocorasick``: pyahocorasick over whole Arrow batches; spacing is vectorized in Arrow and
  a batch is scanned as one string (captions joined by newlines, which no matchable pattern
  contains), so Python work is per match, not per caption or per entry. Runs in processes.
- ``duckdb``: a join of caption tokens (one-token entries) and token bigrams (the first two
  tokens of longer entries) against the entries, then a substring check of the candidates;
  spills to disk under the build's memory_limit.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
from pathlib import Path

import ahocorasick
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.progress import progress

PUNCTS = ",.;:?!`"
_TRANSLATE = str.maketrans({**{c: f" {c} " for c in PUNCTS}, "\t": " ", "\n": " ", "\r": " "})
_MATCH_SQL = Path(__file__).parent / "sql" / "balance_match.sql"
METHODS = ("auto", "duckdb", "ahocorasick")
# Chosen by bench/bench_balance.py at full size (10M captions x 162k entries, 2 cores): the
# batched automaton in 2 processes did 173k captions/s, the DuckDB token join 93k (under heavy
# load from other jobs the order flipped at 1M: 14k vs 48k). Both are exact and bounded in
# memory; duckdb can also be squeezed under a small memory_limit (it spills).
AUTO_METHOD = "ahocorasick"
MATCH_SCHEMA = pa.schema([("uid", pa.string()), ("entry_id", pa.int64())])


def spacing(text: str) -> str:
    """MetaCLIP's spacing of one caption (the reference the set-wise methods must agree with)."""
    return f" {text.translate(_TRANSLATE)} "


def spaced_array(captions: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``spacing`` over an Arrow string array (nulls become empty captions)."""
    s = pc.fill_null(pc.cast(captions, pa.string()), "")
    s = pc.replace_substring_regex(s, r"([,.;:?!`])", r" \1 ")
    s = pc.replace_substring_regex(s, r"[\t\n\r]", " ")
    return pc.binary_join_element_wise(" ", s, " ", "")


def build_automaton(entries: pa.Table) -> ahocorasick.Automaton | None:
    """An automaton of " entry " -> entry_id; None if no entry can match."""
    auto = ahocorasick.Automaton(ahocorasick.STORE_INTS)
    for eid, e in zip(entries.column("entry_id").to_pylist(), entries.column("entry").to_pylist(),
                      strict=True):
        # A spaced caption never contains \t \n \r, so such entries cannot match; leaving them
        # out also makes "\n" a safe separator between captions in one scanned string.
        if "\n" not in e and "\t" not in e and "\r" not in e:
            auto.add_word(f" {e} ", eid)
    if len(auto) == 0:
        return None
    auto.make_automaton()
    return auto


def match_batch(auto: ahocorasick.Automaton | None, uids: pa.Array | pa.ChunkedArray,
                captions: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Distinct (uid, entry_id) matches of one batch of captions."""
    if auto is None or len(captions) == 0:
        return MATCH_SCHEMA.empty_table()
    s = spaced_array(captions)
    s = pc.binary_join_element_wise(s, "\n", "")
    if isinstance(s, pa.ChunkedArray):
        s = s.combine_chunks()
    _, obuf, data = s.buffers()
    odt = np.int64 if pa.types.is_large_string(s.type) else np.int32
    offsets = np.frombuffer(obuf, dtype=odt)[s.offset:s.offset + len(s) + 1]
    big = memoryview(data)[offsets[0]:offsets[-1]].tobytes().decode("utf-8")
    lens = pc.utf8_length(s).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.cumsum(lens) - lens
    flat = np.fromiter(itertools.chain.from_iterable(auto.iter(big)), dtype=np.int64)
    if flat.size == 0:
        return MATCH_SCHEMA.empty_table()
    rows = np.searchsorted(starts, flat[0::2], side="right") - 1
    eids = flat[1::2]
    order = np.lexsort((eids, rows))  # distinct pairs; entry_ids may be any int64
    rows, eids = rows[order], eids[order]
    first = np.ones(rows.size, dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (eids[1:] != eids[:-1])
    uids = pa.chunked_array([uids]) if isinstance(uids, pa.Array) else uids
    return pa.table({"uid": pc.cast(uids.take(pa.array(rows[first])), pa.string()),
                     "entry_id": pa.array(eids[first], pa.int64())}, schema=MATCH_SCHEMA)


_worker_auto: ahocorasick.Automaton | None = None


def _init_worker(entries: pa.Table) -> None:
    global _worker_auto
    _worker_auto = build_automaton(entries)


def _match_row_group(task: tuple[str, int, str, str, str, int]) -> tuple[int, int]:
    path, rg, uid_col, cap_col, out_dir, batch_rows = task
    pf = pq.ParquetFile(path)
    parts = []
    n = 0
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[rg],
                                 columns=[uid_col, cap_col]):
        n += batch.num_rows
        parts.append(match_batch(_worker_auto, batch.column(0), batch.column(1)))
    table = pa.concat_tables(parts) if parts else MATCH_SCHEMA.empty_table()
    pq.write_table(table, Path(out_dir) / f"part-{rg:06d}.parquet")
    return n, table.num_rows


def match_parquet_ac(input_path: Path, entries: pa.Table, out_dir: Path, workers: int = 0,
                     uid_col: str = "uid", caption_col: str = "caption",
                     batch_rows: int = 32768, spawn_min_rows: int = 100_000) -> int:
    """Match a Parquet file's captions row group by row group; parts go to out_dir.

    Returns the number of matches. ``workers`` processes (0 = CPU count) each build the
    automaton once.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    pf = pq.ParquetFile(input_path)
    tasks = [(str(input_path), rg, uid_col, caption_col, str(out_dir), batch_rows)
             for rg in range(pf.num_row_groups)]
    workers = min(workers or os.cpu_count() or 1, max(1, len(tasks)))
    if pf.metadata.num_rows < spawn_min_rows:  # seconds of work: not worth spawning processes
        workers = 1
    bar = progress(total=pf.metadata.num_rows, unit="rows", desc="match", leave=False)
    total = 0
    try:
        if workers == 1:
            _init_worker(entries)
            results = map(_match_row_group, tasks)
            for rows, m in results:
                bar.update(rows)
                total += m
        else:
            ctx = mp.get_context("spawn")  # no fork: the parent may hold DuckDB threads
            with ctx.Pool(workers, initializer=_init_worker, initargs=(entries,)) as pool:
                for rows, m in pool.imap_unordered(_match_row_group, tasks):
                    bar.update(rows)
                    total += m
    finally:
        bar.close()
    if not tasks:
        pq.write_table(MATCH_SCHEMA.empty_table(), out_dir / "part-000000.parquet")
    return total


def register_entries(con: duckdb.DuckDBPyConnection, entries: pa.Table) -> None:
    """Table entry_keys(entry_id, entry, n, key) for the token join."""
    con.register("_entries_arrow", entries.select(["entry_id", "entry"]))
    con.execute("""
        CREATE OR REPLACE TEMP TABLE entry_keys AS
        SELECT entry_id, entry, len(t) AS n,
               CASE WHEN len(t) = 1 THEN t[1] ELSE t[1] || ' ' || t[2] END AS key
        FROM (SELECT entry_id, entry, string_split(entry, ' ') AS t FROM _entries_arrow)
        WHERE NOT regexp_matches(entry, '[\\t\\n\\r]')
    """)
    con.unregister("_entries_arrow")


def match_sql(pool: str) -> str:
    """The token-join query over relation ``pool(uid, caption)``; needs ``entry_keys``."""
    return _MATCH_SQL.read_text().replace("{pool}", pool)


def match_parquet_duckdb(con: duckdb.DuckDBPyConnection, input_path: Path, entries: pa.Table,
                         out_dir: Path, uid_col: str = "uid", caption_col: str = "caption",
                         chunk_rows: int = 1_000_000) -> int:
    """Match with DuckDB, one part file per chunk of row groups; returns the number of matches.

    Matching is per caption, so chunks are exact; they bound memory whatever the pool size
    (one query over 10M captions needed > 512 MB and failed to spill in the benchmark).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    register_entries(con, entries)
    pf = pq.ParquetFile(input_path)
    chunks: list[list[int]] = [[]]
    size = 0
    for rg in range(pf.num_row_groups):
        if size >= chunk_rows:
            chunks.append([])
            size = 0
        chunks[-1].append(rg)
        size += pf.metadata.row_group(rg).num_rows
    sql = match_sql("pool_chunk")
    total = 0
    with progress(total=pf.metadata.num_rows, unit="rows", desc="match", leave=False) as bar:
        for k, rgs in enumerate(chunks):
            t = pf.read_row_groups(rgs, columns=[uid_col, caption_col]) if rgs else \
                pa.table({uid_col: pa.array([], pa.string()),
                          caption_col: pa.array([], pa.string())})
            chunk = pa.table({"uid": pc.cast(t.column(0), pa.string()),
                              "caption": pc.cast(t.column(1), pa.string())})
            con.register("pool_chunk", chunk)
            out = str(out_dir / f"part-{k:06d}.parquet").replace("'", "''")
            con.execute(f"COPY ({sql}) TO '{out}' (FORMAT parquet)")
            con.unregister("pool_chunk")
            total += pq.read_metadata(out).num_rows
            bar.update(chunk.num_rows)
    return total


def resolve_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"matching method {method!r} is not one of {', '.join(METHODS)}")
    return AUTO_METHOD if method == "auto" else method


def match_parquet(con: duckdb.DuckDBPyConnection, input_path: Path, entries: pa.Table,
                  out_dir: Path, method: str = "auto", workers: int = 0) -> int:
    """Write distinct matches(uid, entry_id) of a pool as Parquet parts in out_dir."""
    if resolve_method(method) == "duckdb":
        return match_parquet_duckdb(con, input_path, entries, out_dir)
    return match_parquet_ac(input_path, entries, out_dir, workers)
