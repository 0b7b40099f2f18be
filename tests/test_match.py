"""MetaCLIP substring matching: both set-wise methods agree with the direct definition."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import match

WORDS = ["a", "dog", "Dog", "New", "York", "U", "S", "é", "café", "日本", "🐶", "x-y", "it's"]
SEPS = [" ", "  ", ",", ", ", ".", ". ", ";", ":", "?", "!", "`", "\t", "\n", "\r", "\r\n",
        "\xa0", " - ", "'", '"', "(", ")"]


def reference(uids: list[str], captions: list[str | None], entries: list[str]) -> set:
    """The definition, one caption and one entry at a time (MetaCLIP's spacing, str `in`)."""
    return {(u, i) for u, c in zip(uids, captions, strict=True)
            for i, e in enumerate(entries) if f" {e} " in match.spacing(c or "")}


def entries_table(entries: list[str]) -> pa.Table:
    return pa.table({"entry_id": pa.array(range(len(entries)), pa.int64()),
                     "entry": pa.array(entries, pa.string())})


def run_ac(uids: list[str], captions: list[str | None], entries: list[str]) -> set:
    auto = match.build_automaton(entries_table(entries))
    t = match.match_batch(auto, pa.array(uids, pa.string()), pa.array(captions, pa.string()))
    pairs = list(zip(t.column("uid").to_pylist(), t.column("entry_id").to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs)), "matches must be distinct"
    return set(pairs)


_CON = duckdb.connect()


def run_duckdb(uids: list[str], captions: list[str | None], entries: list[str]) -> set:
    match.register_entries(_CON, entries_table(entries))
    _CON.register("pool", pa.table({"uid": pa.array(uids, pa.string()),
                                    "caption": pa.array(captions, pa.string())}))
    rows = _CON.execute(match.match_sql("pool")).fetchall()
    _CON.unregister("pool")
    assert len(rows) == len(set(rows)), "matches must be distinct"
    return set(rows)


fragment = st.one_of(st.sampled_from(WORDS), st.sampled_from(SEPS), st.text(max_size=3))
# Entries built from the same pieces so they often match: multi-word, double spaces,
# punctuation inside, leading/trailing spaces, empty, or tab (never matches).
entry = st.one_of(
    st.sampled_from(WORDS),
    st.lists(st.sampled_from(WORDS), min_size=2, max_size=4).map(" ".join),
    st.lists(st.one_of(st.sampled_from(WORDS), st.sampled_from(SEPS)), min_size=1,
             max_size=5).map("".join),
    st.text(max_size=4),
)


@st.composite
def pool(draw):
    """Entries, and captions made of random fragments and of the entries themselves with
    their spaces swapped for other separators (tab, CR, punctuation...): near misses."""
    entries = draw(st.lists(entry, min_size=1, max_size=15, unique=True))
    def mangled(e: str) -> str:
        return "".join(draw(st.sampled_from([" ", " ", *SEPS])) if ch == " " else ch for ch in e)
    piece = st.one_of(fragment, st.sampled_from(entries), st.sampled_from(entries).map(mangled))
    captions = draw(st.lists(st.one_of(st.none(), st.lists(piece, max_size=12).map("".join)),
                             min_size=1, max_size=12))
    return captions, entries


SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(pool())
def test_ahocorasick_agrees_with_reference(p):
    captions, entries = p
    uids = [f"u{i}" for i in range(len(captions))]
    assert run_ac(uids, captions, entries) == reference(uids, captions, entries)


@SETTINGS
@given(pool())
def test_duckdb_agrees_with_reference(p):
    captions, entries = p
    uids = [f"u{i}" for i in range(len(captions))]
    assert run_duckdb(uids, captions, entries) == reference(uids, captions, entries)


ADVERSARIAL_CAPTIONS = [
    "New York, New York.", "U.S. army", "dog dog dog", "dog,dog", "a  b", "a\tb", "a \tb",
    "a, b", "", "  ", None, "a\rb", "a\nb", "Dog", "café!", "`quoted`", "x?y", "end.",
    "日本 🐶", "a b a b",
    ("the dog " * 3000) + "New York",  # a very long caption
]
ADVERSARIAL_ENTRIES = [
    "dog", "Dog", "New York", "York", "U.S.", "U", "S", ".", ",", "a  b", "a b", "a", "b",
    "", " ", " dog", "dog ", "café", "café!", "`quoted`", "quoted", "x?y", "x", "日本 🐶",
    "a\tb", "dog dog", "b a", "end", "New York New York",
]


@pytest.mark.parametrize("method", [run_ac, run_duckdb])
def test_adversarial_fixed_cases(method):
    uids = [f"u{i}" for i in range(len(ADVERSARIAL_CAPTIONS))]
    got = method(uids, ADVERSARIAL_CAPTIONS, ADVERSARIAL_ENTRIES)
    assert got == reference(uids, ADVERSARIAL_CAPTIONS, ADVERSARIAL_ENTRIES)
    e = {x: i for i, x in enumerate(ADVERSARIAL_ENTRIES)}
    # Spot checks of the semantics itself, so agreeing on a wrong reference cannot pass.
    def has(cap: str, ent: str) -> bool:
        return (f"u{ADVERSARIAL_CAPTIONS.index(cap)}", e[ent]) in got

    assert has("New York, New York.", "New York")
    assert not has("New York, New York.", "New York New York")
    assert not has("U.S. army", "U.S.") and has("U.S. army", "U")
    assert has("dog,dog", "dog")  # spaced to " dog , dog "
    assert has("a  b", "a  b") and not has("a  b", "a b")
    assert has("a\tb", "a b") and not has("a\tb", "a\tb")
    assert has("a \tb", "a  b")
    assert has("a\rb", "a b") and has("a\nb", "a b")
    assert not has("Dog", "dog") and has("Dog", "Dog")
    assert not has("café!", "café!") and has("café!", "café")
    assert has(ADVERSARIAL_CAPTIONS[-1], "New York")


@pytest.mark.parametrize("method", ["ahocorasick", "duckdb"])
def test_match_parquet_over_row_groups_and_processes(tmp_path, method):
    captions = [f"dog number {i}, in New York" if i % 3 else f"cat {i}." for i in range(5000)]
    uids = [f"u{i:05d}" for i in range(len(captions))]
    src = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"uid": uids, "caption": captions, "extra": list(range(5000))}),
                   src, row_group_size=700)
    entries = ["dog", "cat", "New York", "number 7", "in", "1"]
    out = tmp_path / "m"
    if method == "ahocorasick":  # two spawned processes even for a small pool
        n = match.match_parquet_ac(src, entries_table(entries), out, workers=2,
                                   spawn_min_rows=0)
    else:
        n = match.match_parquet(duckdb.connect(), src, entries_table(entries), out, method)
    got = pq.read_table(out).to_pylist()
    pairs = {(r["uid"], r["entry_id"]) for r in got}
    assert n == len(got) == len(pairs)
    assert pairs == reference(uids, captions, entries)


def test_duckdb_chunks_give_the_same_pairs(tmp_path):
    captions = [f"dog {i}, New York" if i % 2 else f"cat {i}." for i in range(3000)]
    uids = [f"u{i:05d}" for i in range(len(captions))]
    src = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"uid": uids, "caption": captions}), src, row_group_size=400)
    entries = ["dog", "cat", "New York", "1"]
    n = match.match_parquet_duckdb(duckdb.connect(), src, entries_table(entries),
                                   tmp_path / "m", chunk_rows=1000)
    assert len(list((tmp_path / "m").glob("part-*.parquet"))) == 3
    got = pq.read_table(tmp_path / "m").to_pylist()
    assert n == len(got) and {(r["uid"], r["entry_id"]) for r in got} == reference(
        uids, captions, entries)


def test_no_matchable_entries_gives_empty_result(tmp_path):
    src = tmp_path / "pool.parquet"
    pq.write_table(pa.table({"uid": ["a"], "caption": ["a\tb"]}), src)
    n = match.match_parquet_ac(src, entries_table(["a\tb"]), tmp_path / "m", workers=1)
    assert n == 0 and pq.read_table(tmp_path / "m").num_rows == 0


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="not one of"):
        match.resolve_method("regex")
    assert match.resolve_method("auto") in ("duckdb", "ahocorasick")
