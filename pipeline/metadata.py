"""`witforge metadata`: build the MetaCLIP-style entry list that the balance stage matches.

Entries come, in this order, from WordNet lemma names, frequent English unigrams (wordfreq),
high-PMI bigrams counted over a user's text corpus, a user's list of titles and the numbers
0-99; or from a ready JSON list of strings (the shape of MetaCLIP's ``metadata.json``). The list
is de-duplicated keeping the first occurrence, and is case-sensitive like MetaCLIP's, so "Apple"
and "apple" are two entries. Output: ``metadata.parquet`` with ``entry_id, entry, source``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_WORDNET = "/usr/share/wordnet"
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
# Adjective lemmas in data.adj carry a syntactic marker: "beautiful(a)", "galore(ip)".
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")
_BIGRAMS_SQL = Path(__file__).parent / "sql" / "balance_bigrams.sql"


def wordnet_lemmas(folder: str | Path) -> Iterator[str]:
    """Lemma names of every synset in a WordNet 3.0 database folder, '_' turned into spaces.

    Reads the ``data.*`` files (the synset records); lines starting with two spaces are the
    licence header. Record layout: offset lex_filenum ss_type w_cnt(hex) [word lex_id]...
    """
    folder = Path(folder)
    found = [folder / n for n in WORDNET_FILES if (folder / n).is_file()]
    if not found:
        raise ValueError(f"{folder}: no WordNet data files ({', '.join(WORDNET_FILES)})")
    for path in found:
        with path.open(encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if line.startswith("  ") or not line.strip():
                    continue
                parts = line.split(" ")
                try:
                    count = int(parts[3], 16)
                    words = [parts[4 + 2 * i] for i in range(count)]
                except (IndexError, ValueError) as e:
                    raise ValueError(f"{path}:{lineno}: not a WordNet synset record") from e
                for w in words:
                    yield _ADJ_MARKER.sub("", w).replace("_", " ")


def frequent_unigrams(min_frequency: float = 1e-6, top_n: int = 0) -> list[str]:
    """English words from wordfreq with frequency >= min_frequency (or the top_n most common)."""
    import wordfreq

    if top_n:
        return wordfreq.top_n_list("en", top_n)
    out = []
    for w in wordfreq.iter_wordlist("en"):  # most frequent first
        if wordfreq.word_frequency(w, "en") < min_frequency:
            break
        out.append(w)
    return out


def pmi_bigrams(con: duckdb.DuckDBPyConnection, texts_sql: str, min_count: int = 5,
                min_pmi: float = 5.0, top_n: int = 0) -> list[tuple[str, float]]:
    """Bigrams of adjacent words with PMI >= min_pmi over the texts of ``texts_sql``.

    ``texts_sql`` is a query with one VARCHAR column ``text``. Words are split exactly as the
    matcher splits captions (MetaCLIP spacing, then single spaces), so every bigram kept can
    actually match. PMI = log2(c(ab) * N / (c(a) * c(b))), N the number of word tokens.
    """
    sql = _BIGRAMS_SQL.read_text().replace("{texts}", texts_sql)
    rows = con.execute(sql, {"min_count": min_count, "min_pmi": min_pmi}).fetchall()
    return rows[:top_n] if top_n else rows


def corpus_query(files: list[str], parquet: list[str], column: str) -> str:
    """A SQL query yielding one ``text`` row per line of the text files / per Parquet value."""
    parts = []
    for f in files:
        if not Path(f).is_file():
            raise ValueError(f"{f}: corpus file not found")
        lit = f.replace("'", "''")
        parts.append(f"SELECT unnest(string_split(content, chr(10))) AS text "
                     f"FROM read_text('{lit}')")
    for f in parquet:
        if not Path(f).is_file():
            raise ValueError(f"{f}: corpus Parquet file not found")
        lit = f.replace("'", "''")
        col = column.replace('"', '""')
        parts.append(f'SELECT "{col}"::VARCHAR AS text FROM read_parquet(\'{lit}\')')
    return " UNION ALL ".join(parts)


def read_list(path: str | Path) -> list[str]:
    """A JSON list of strings, or a text file with one entry per line (blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: file not found")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON: {e}") from e
        if not isinstance(data, list):
            raise ValueError(f"{p}: expected a JSON list of strings")
        for i, x in enumerate(data):
            if not isinstance(x, str):
                raise ValueError(f"{p}: item {i} is {type(x).__name__}, not a string")
        return data
    return [line.strip() for line in text.splitlines() if line.strip()]


def assemble(sources: Iterable[tuple[str, Iterable[str]]]) -> pa.Table:
    """De-duplicate (case-sensitive, first source wins) into entry_id, entry, source."""
    seen: set[str] = set()
    entries, origin = [], []
    for name, items in sources:
        for e in items:
            if e not in seen:
                seen.add(e)
                entries.append(e)
                origin.append(name)
    return pa.table({
        "entry_id": pa.array(range(len(entries)), pa.int64()),
        "entry": pa.array(entries, pa.string()),
        "source": pa.array(origin, pa.string()),
    })


def load_metadata(path: str | Path) -> pa.Table:
    """Entries (entry_id, entry) from metadata.parquet or a JSON list of strings.

    A JSON list gets entry_id = its position after de-duplication (keep the first).
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: metadata file not found (build one with `witforge metadata`)")
    if p.suffix == ".json":
        return assemble([("json", read_list(p))]).select(["entry_id", "entry"])
    try:
        t = pq.read_table(p)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{p}: not a Parquet file: {e}") from e
    missing = {"entry_id", "entry"} - set(t.column_names)
    if missing:
        raise ValueError(f"{p}: missing column(s) {sorted(missing)}")
    t = t.select(["entry_id", "entry"]).cast(pa.schema([("entry_id", pa.int64()),
                                                        ("entry", pa.string())]))
    if t.column("entry_id").null_count or t.column("entry").null_count:
        raise ValueError(f"{p}: entry_id and entry must not be null")
    if len(set(t.column("entry_id").to_pylist())) != t.num_rows:
        raise ValueError(f"{p}: entry_id values are not unique")
    if len(set(t.column("entry").to_pylist())) != t.num_rows:
        raise ValueError(f"{p}: entry values are not unique")
    return t


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="witforge metadata",
        description="Build the MetaCLIP-style metadata (the query list the balance stage "
        "matches captions against) and write metadata.parquet (entry_id, entry, source). "
        "Entries are de-duplicated case-sensitively; earlier sources win.",
    )
    p.add_argument("--out", required=True, help="output metadata.parquet")
    p.add_argument("--from-json", metavar="FILE",
                   help="use a ready JSON list of strings (MetaCLIP's metadata.json) instead "
                   "of building; other source flags are then not allowed")
    p.add_argument("--wordnet", default=DEFAULT_WORDNET, metavar="DIR",
                   help="WordNet database folder with data.noun etc. (default: %(default)s, "
                   "Debian wordnet-base)")
    p.add_argument("--no-wordnet", action="store_true", help="skip WordNet lemmas")
    p.add_argument("--unigram-min-freq", type=float, default=1e-6, metavar="F",
                   help="keep wordfreq English words with frequency >= F (default %(default)s)")
    p.add_argument("--unigram-top", type=int, default=0, metavar="N",
                   help="instead keep the N most frequent words")
    p.add_argument("--no-unigrams", action="store_true", help="skip wordfreq unigrams")
    p.add_argument("--corpus", nargs="*", default=[], metavar="FILE",
                   help="text files (one document per line) to count bigrams in")
    p.add_argument("--corpus-parquet", nargs="*", default=[], metavar="FILE",
                   help="Parquet files whose --corpus-column holds texts to count bigrams in")
    p.add_argument("--corpus-column", default="caption", help="default: %(default)s")
    p.add_argument("--bigram-min-count", type=int, default=5, help="default: %(default)s")
    p.add_argument("--bigram-min-pmi", type=float, default=5.0,
                   help="log2 PMI threshold (default %(default)s; 5 ≈ MetaCLIP's ratio 30)")
    p.add_argument("--bigram-top", type=int, default=0, help="keep at most N, highest PMI first")
    p.add_argument("--titles", nargs="*", default=[], metavar="FILE",
                   help="title lists: .json list of strings or text with one title per line")
    p.add_argument("--no-numbers", action="store_true", help="skip the numbers 0-99")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        return _build(args)
    except (ValueError, duckdb.Error) as e:
        print(f"witforge metadata: error: {e}", file=sys.stderr)
        return 2


def _build(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.from_json:
        table = assemble([("json", read_list(args.from_json))])
    else:
        sources: list[tuple[str, Iterable[str]]] = []
        if not args.no_wordnet:
            sources.append(("wordnet", wordnet_lemmas(args.wordnet)))
        if not args.no_unigrams:
            sources.append(("wordfreq", frequent_unigrams(args.unigram_min_freq,
                                                          args.unigram_top)))
        if args.corpus or args.corpus_parquet:
            q = corpus_query(args.corpus, args.corpus_parquet, args.corpus_column)
            rows = pmi_bigrams(duckdb.connect(), q, args.bigram_min_count, args.bigram_min_pmi,
                               args.bigram_top)
            sources.append(("bigram", [b for b, _ in rows]))
        for f in args.titles:
            sources.append(("title", read_list(f)))
        if not args.no_numbers:
            sources.append(("number", [str(i) for i in range(100)]))
        table = assemble(sources)
    if table.num_rows == 0:
        raise ValueError("no entries: every source was disabled or empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    by_source = {}
    for s in table.column("source").to_pylist():
        by_source[s] = by_source.get(s, 0) + 1
    detail = ", ".join(f"{k} {v:,}" for k, v in by_source.items())
    print(f"wrote {out}: {table.num_rows:,} entries ({detail})")
    return 0
