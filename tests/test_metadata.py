"""`witforge metadata`: WordNet, wordfreq, PMI bigrams, titles, numbers; JSON lists."""

from __future__ import annotations

import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import metadata

LICENCE = "  1 This software and database is being provided to you, the LICENSEE, by  \n" \
          "  2 Princeton University under the following license.  \n"


def make_wordnet(folder):
    """A tiny database in WordNet 3.0's data.* format (header lines start with two spaces)."""
    folder.mkdir()
    (folder / "data.noun").write_text(
        LICENCE
        + "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived  \n"
        + "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 001 @ 02083346 n 0000 "
          "| a member of the genus Canis  \n"
        + "09044862 15 n 05 United_States 0 United_States_of_America 0 America 0 U.S. 0 "
          "US 0 001 @ 08544813 n 0000 | North American republic  \n")
    (folder / "data.adj").write_text(
        LICENCE
        + "00217728 00 s 02 beautiful(a) 0 lovely 0 001 & 00217728 a 0000 | delighting  \n"
        + "01678586 00 s 01 galore(ip) 0 001 & 01678586 a 0000 | in great numbers  \n")


def test_wordnet_lemmas_from_crafted_files(tmp_path):
    make_wordnet(tmp_path / "wn")
    lemmas = list(metadata.wordnet_lemmas(tmp_path / "wn"))
    assert lemmas == ["entity", "dog", "domestic dog", "Canis familiaris", "United States",
                      "United States of America", "America", "U.S.", "US", "beautiful",
                      "lovely", "galore"]


def test_wordnet_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="no WordNet data files"):
        list(metadata.wordnet_lemmas(tmp_path))
    (tmp_path / "data.noun").write_text("00001740 03 n zz entity\n")
    with pytest.raises(ValueError, match=r"data.noun:1: not a WordNet synset record"):
        list(metadata.wordnet_lemmas(tmp_path))


def test_frequent_unigrams_threshold_and_top_n():
    import wordfreq

    common = metadata.frequent_unigrams(min_frequency=1e-4)
    assert "the" in common and "dog" not in common or wordfreq.word_frequency("dog", "en") >= 1e-4
    assert all(wordfreq.word_frequency(w, "en") >= 1e-4 for w in common)
    more = metadata.frequent_unigrams(min_frequency=1e-5)
    assert len(more) > len(common) and more[: len(common)] == common
    assert metadata.frequent_unigrams(top_n=5) == wordfreq.top_n_list("en", 5)


def test_pmi_bigrams_from_text_files_and_parquet(tmp_path):
    lines = ["I flew to New York today", "New York is big. the cat sat",
             "we love New York, really", "the dog and the cat", "the big dog",
             "York and New are words", "San Francisco San Francisco"]
    lines += ["the end of the story the"] * 3
    (tmp_path / "c.txt").write_text("\n".join(lines))
    q = metadata.corpus_query([str(tmp_path / "c.txt")], [], "caption")
    got = dict(metadata.pmi_bigrams(duckdb.connect(), q, min_count=2, min_pmi=2.5))
    assert "New York" in got and "San Francisco" in got
    assert "the cat" not in got  # "the" is everywhere: low PMI
    assert "York is" not in got  # seen once: below min_count
    assert "big the" not in got  # "." in between breaks adjacency
    # PMI is log2(c(ab) N / (c(a) c(b))) over word tokens.
    tokens = sum(len(x.replace(",", " ").replace(".", " ").split()) for x in lines)
    assert got["San Francisco"] == pytest.approx(
        __import__("math").log2(2 * tokens / (2 * 2)))
    pq.write_table(pa.table({"text": lines}), tmp_path / "c.parquet")
    q2 = metadata.corpus_query([], [str(tmp_path / "c.parquet")], "text")
    assert dict(metadata.pmi_bigrams(duckdb.connect(), q2, 2, 2.5)) == got
    assert len(metadata.pmi_bigrams(duckdb.connect(), q2, 2, 2.0, top_n=1)) == 1


def test_cli_builds_deduplicated_case_sensitive_parquet(tmp_path, capsys):
    make_wordnet(tmp_path / "wn")
    (tmp_path / "titles.txt").write_text("Casablanca\ndog\n\nUS\nus\n")
    (tmp_path / "c.txt").write_text("\n".join(["hot dog stand"] * 3 + ["a b c d e f"] * 2))
    out = tmp_path / "meta" / "metadata.parquet"
    rc = metadata.main(["--out", str(out), "--wordnet", str(tmp_path / "wn"),
                        "--unigram-top", "50", "--corpus", str(tmp_path / "c.txt"),
                        "--bigram-min-count", "3", "--bigram-min-pmi", "0",
                        "--titles", str(tmp_path / "titles.txt")])
    assert rc == 0 and "entries" in capsys.readouterr().out
    t = pq.read_table(out).to_pylist()
    entries = [r["entry"] for r in t]
    assert [r["entry_id"] for r in t] == list(range(len(t)))
    assert len(entries) == len(set(entries))
    src = {r["entry"]: r["source"] for r in t}
    assert src["domestic dog"] == "wordnet" and src["dog"] == "wordnet"  # first source wins
    assert src["the"] == "wordfreq" and src["Casablanca"] == "title"
    assert src["us"] == "title" and src["US"] == "wordnet"  # case-sensitive
    assert src["hot dog"] == "bigram" and src["99"] == "number" and src["0"] == "number"
    assert [e for e in entries if src[e] == "number"] == [
        str(i) for i in range(100) if src[str(i)] == "number"]


def test_json_list_roundtrip_and_loader(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps(["dog", "Dog", "dog", "New York"]))
    t = metadata.load_metadata(tmp_path / "m.json")
    assert t.to_pylist() == [{"entry_id": 0, "entry": "dog"}, {"entry_id": 1, "entry": "Dog"},
                             {"entry_id": 2, "entry": "New York"}]
    out = tmp_path / "m.parquet"
    assert metadata.main(["--out", str(out), "--from-json", str(tmp_path / "m.json")]) == 0
    assert metadata.load_metadata(out).to_pylist() == t.to_pylist()
    assert set(pq.read_table(out).column("source").to_pylist()) == {"json"}


def test_loader_and_cli_errors(tmp_path, capsys):
    (tmp_path / "bad.json").write_text(json.dumps({"dog": 1}))
    with pytest.raises(ValueError, match="bad.json: expected a JSON list"):
        metadata.load_metadata(tmp_path / "bad.json")
    (tmp_path / "mixed.json").write_text(json.dumps(["dog", 3]))
    with pytest.raises(ValueError, match="item 1 is int"):
        metadata.load_metadata(tmp_path / "mixed.json")
    pq.write_table(pa.table({"entry_id": [0, 0], "entry": ["a", "b"]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="entry_id values are not unique"):
        metadata.load_metadata(tmp_path / "d.parquet")
    pq.write_table(pa.table({"id": [0]}), tmp_path / "c.parquet")
    with pytest.raises(ValueError, match="missing column"):
        metadata.load_metadata(tmp_path / "c.parquet")
    with pytest.raises(ValueError, match="metadata file not found"):
        metadata.load_metadata(tmp_path / "nope.parquet")
    rc = metadata.main(["--out", str(tmp_path / "o.parquet"), "--wordnet", str(tmp_path)])
    assert rc == 2 and "no WordNet data files" in capsys.readouterr().err
