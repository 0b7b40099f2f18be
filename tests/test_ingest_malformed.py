"""Ingest on malformed manifests (issue 15): bad JSON Lines lines are dropped one by one with
their file and line, a column named twice and a directory given as a file fail the stage."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.ingest_sources as ingest_sources
from pipeline.config import load_build
from pipeline.ledger import audit
from pipeline.stage import StageError, kept_of, run_stage


def _build(tmp_path: Path, sources: str) -> Path:
    y = tmp_path / "build.yaml"
    y.write_text(f"name: t\nruns_dir: {tmp_path / 'runs'}\nsources:\n{sources}")
    return y


def _run(tmp_path: Path, sources: str):
    cfg = load_build(_build(tmp_path, sources))
    return cfg, run_stage(cfg, "ingest", log=lambda s: None)


def _kept(cfg) -> list[tuple]:
    return duckdb.sql(f"SELECT url, caption FROM '{kept_of(cfg, 'ingest')}' "
                      "ORDER BY url, caption").fetchall()


def _dropped(cfg) -> list[tuple]:
    p = kept_of(cfg, "ingest").parent / "dropped.parquet"
    return duckdb.sql(f"SELECT reason, detail FROM '{p}' ORDER BY detail").fetchall()


def _line(i: int) -> bytes:
    return json.dumps({"url": f"http://a.org/{i}", "caption": f"caption {i}"}).encode()


# Line by line: what each bad line is and the `why` the ledger must give it. Line 7 is
# blank and line 8 only whitespace: no rows, as in every JSON Lines reader (read_json too).
BAD = {
    2: (b'{"url": "http://a.org/x", "caption": "cut', "not valid JSON"),
    3: (b"[1,2]", "a JSON array, not an object"),
    4: (b'"str"', "a JSON string, not an object"),
    5: (b"42", "a JSON number, not an object"),
    6: (b'{"url": "http://a.org/6", "url": "http://a.org/66", "caption": "two urls"}',
        "an object with a repeated key"),
    10: (b'{"url": "http://a.org/10", "caption": "caf\xe9 latin-1"}', "not valid UTF-8"),
}


def _messy_jsonl() -> tuple[bytes, list[tuple]]:
    """12 lines: good at 1, 9, 11; bad at BAD; blank 7, 8; a truncated last line 12."""
    lines = {1: _line(1), 7: b"", 8: b"  \t", 9: _line(9), 11: _line(11)}
    lines.update({k: v for k, (v, _) in BAD.items()})
    text = b"\n".join(lines[k] for k in range(1, 12)) + b'\n{"url": "http://a.org/12", "capt'
    good = [(f"http://a.org/{i}", f"caption {i}") for i in (1, 11, 9)]
    return text, sorted(good)


@pytest.mark.parametrize("name", ["m.jsonl", "m.jsonl.gz"])
def test_bad_jsonl_lines_are_dropped_with_file_and_line(tmp_path: Path, name: str) -> None:
    text, good = _messy_jsonl()
    p = tmp_path / name
    p.write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    cfg, r = _run(tmp_path, f"  - {{path: {name}}}\n")
    assert _kept(cfg) == good
    want = [(f"{p}:{k}: {why}", "unreadable_row") for k, (_, why) in BAD.items()]
    want.append((f"{p}:12: not valid JSON", "unreadable_row"))
    assert sorted((d, r) for r, d in _dropped(cfg)) == sorted(want)
    assert (r["rows_in"], r["kept"], r["dropped"]) == (10, 3, 7)  # blank lines are no rows
    (a,) = audit(cfg)
    assert a.ok


def test_one_bad_line_in_a_gzipped_jsonl(tmp_path: Path) -> None:
    lines = [_line(i) for i in range(1, 201)]
    lines[149] = b'{"url": "http://a.org/150", "caption": oops}'
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    cfg, r = _run(tmp_path, "  - {path: m.jsonl.gz}\n")
    assert (r["rows_in"], r["kept"], r["dropped_by_reason"]) == (200, 199, {"unreadable_row": 1})
    assert _dropped(cfg) == [("unreadable_row", f"{tmp_path / 'm.jsonl.gz'}:150: not valid JSON")]


def test_a_jsonl_of_only_bad_lines_keeps_nothing_and_drops_every_line(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_bytes(b'{"url": \n42\n"x"\n{oops}\n[1, 2]\n')
    cfg, r = _run(tmp_path, "  - {path: m.jsonl}\n")
    assert (r["rows_in"], r["kept"], r["dropped_by_reason"]) == (5, 0, {"unreadable_row": 5})
    assert sorted(int(d.rsplit(":", 2)[1]) for _, d in _dropped(cfg)) == [1, 2, 3, 4, 5]
    assert _kept(cfg) == []
    (a,) = audit(cfg)
    assert a.ok


def test_line_numbers_hold_across_read_chunks(tmp_path: Path, monkeypatch) -> None:
    # 64-byte chunks: most lines start in one chunk and end in the next
    monkeypatch.setattr(ingest_sources, "JSONL_CHUNK", 64)
    lines = [_line(i) for i in range(1, 41)]
    for k in (1, 17, 40):
        lines[k - 1] = b"{broken line %d" % k
    (tmp_path / "m.jsonl").write_bytes(b"\r\n".join(lines))  # CRLF, no final newline
    cfg, r = _run(tmp_path, "  - {path: m.jsonl}\n")
    assert r["kept"] == 37
    assert sorted(d for _, d in _dropped(cfg)) == sorted(
        f"{tmp_path / 'm.jsonl'}:{k}: not valid JSON" for k in (1, 17, 40))


def test_a_bad_line_does_not_change_how_the_other_lines_read(tmp_path: Path) -> None:
    # The clean file goes through read_json, the one with a bad line through the line-wise
    # path: every other line must come out the same, non-string values included. A `null`
    # line is a record of NULLs in read_json: dropped as missing_url on both paths.
    rows = [{"url": "http://a.org/1", "caption": "caf\u00e9 \u201cq\u201d \ud83d\ude00"},
            {"url": ["http://a.org/2", "x"], "caption": "a list url"},
            {"url": "http://a.org/3", "caption": 1.50},
            {"url": "http://a.org/4", "caption": {"k": [1, True]}},
            {"url": "http://a.org/5"}, {"caption": "no url"}, None,
            {"url": "http://a.org/6", "caption": "tab\there", "extra": 1}]
    clean = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "m.jsonl").write_bytes(clean)
    (tmp_path / "b" / "m.jsonl").write_bytes(clean + b"{not json\n")
    ca, ra = _run(tmp_path / "a", "  - {path: m.jsonl}\n")
    cb, rb = _run(tmp_path / "b", "  - {path: m.jsonl}\n")
    assert _kept(ca) == _kept(cb)
    assert ("http://a.org/3", "1.5") in _kept(ca)  # the number's JSON text, not '"1.5"'
    assert ("http://a.org/4", '{"k":[1,true]}') in _kept(ca)
    assert ra["dropped_by_reason"] == {"missing_url": 2, "bad_url_scheme": 1}
    assert rb["dropped_by_reason"] == {"missing_url": 2, "bad_url_scheme": 1,
                                       "unreadable_row": 1}


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_mixed_value_types_keep_string_urls_unquoted(tmp_path: Path, fmt: str) -> None:
    # DuckDB's type detection made the url column JSON (a list among strings), and JSON's
    # ::VARCHAR kept the quotes: every url read '"http://..."' and was dropped.
    rows = [{"url": "http://a.org/1", "caption": "one"}, {"url": [1], "caption": "two"}]
    text = (json.dumps(rows) if fmt == "json" else
            "".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / f"m.{fmt}").write_text(text)
    cfg, r = _run(tmp_path, f"  - {{path: m.{fmt}}}\n")
    assert _kept(cfg) == [("http://a.org/1", "one")]
    assert r["dropped_by_reason"] == {"bad_url_scheme": 1}


def test_bom_and_crlf_jsonl_reads_every_line(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_bytes(b"\xef\xbb\xbf" + _line(1) + b"\r\n" + _line(2) + b"\r\n")
    cfg, r = _run(tmp_path, "  - {path: m.jsonl}\n")
    assert _kept(cfg) == [("http://a.org/1", "caption 1"), ("http://a.org/2", "caption 2")]
    assert r["dropped"] == 0


@pytest.mark.parametrize("text, how", [
    ('[{"url": "http://a.org/1", "caption": "x"},\n {"url": "http://a.org/2", "caption": "y"}]\n',
     "spread over lines"),
    ('[{"url": "http://a.org/1", "caption": "x"}]\n', "on one line"),
])
def test_a_json_array_named_jsonl_fails_saying_so(tmp_path: Path, text: str, how: str) -> None:
    (tmp_path / "m.jsonl").write_text(text)
    with pytest.raises(StageError) as e:
        _run(tmp_path, "  - {path: m.jsonl}\n")
    assert str(e.value) == (f"{tmp_path / 'm.jsonl'}: this is one JSON array ({how}), not JSON "
                            "Lines (one object per line): set sources[0].format: json")


def test_jsonl_without_the_caption_key_fails_naming_it(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_bytes(b'{"url": "http://a.org/1", "text": "x"}\n{bad\n')
    with pytest.raises(StageError) as e:
        _run(tmp_path, "  - {path: m.jsonl}\n")
    assert str(e.value) == (f"{tmp_path / 'm.jsonl'}: no column 'caption' "
                            "(sources[0].caption_col); its columns are: url, text")


def test_a_truncated_gz_jsonl_fails_naming_the_file(tmp_path: Path) -> None:
    data = gzip.compress(b"\n".join(_line(i) for i in range(2000)) + b"\n")
    (tmp_path / "m.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(StageError) as e:
        _run(tmp_path, "  - {path: m.jsonl.gz}\n")
    assert str(e.value).startswith(f"{tmp_path / 'm.jsonl.gz'}: cannot read it: ")


# --- a column named twice --------------------------------------------------------------


@pytest.mark.parametrize("name, header, msg", [
    ("x.csv", "url,caption,caption", "two columns named 'caption' (columns 2 and 3)"),
    ("x.csv", "caption,url,x,caption,caption", "three columns named 'caption' (columns 1, 4 "
     "and 5)"),
    ("x.csv", "url,Caption,caption", "two columns named 'caption' (columns 2 and 3; names "
     "match case-insensitively: 'Caption', 'caption')"),
    ("x.tsv", "url\tcaption\tcaption", "two columns named 'caption' (columns 2 and 3)"),
    ("x.csv.gz", "url,url,caption", "two columns named 'url' (columns 1 and 2)"),
])
def test_a_column_we_read_named_twice_fails(tmp_path: Path, name: str, header: str,
                                            msg: str) -> None:
    sep = "\t" if ".tsv" in name else ","
    text = (header + "\n" + sep.join(["http://a.org/1"] * len(header.split(sep))) + "\n")
    p = tmp_path / name
    p.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    key = "url_col" if "'url'" in msg else "caption_col"
    with pytest.raises(StageError) as e:
        _run(tmp_path, f"  - {{path: {name}}}\n")
    assert str(e.value) == f"{p}: the header has {msg}; rename one or set sources[0].{key}"
    assert not (tmp_path / "runs" / "t" / "01_ingest").exists()


def test_a_parquet_column_named_twice_fails(tmp_path: Path) -> None:
    t = pa.Table.from_arrays([pa.array(["http://a.org/1"]), pa.array(["a"]), pa.array(["b"])],
                             names=["url", "caption", "caption"])
    pq.write_table(t, tmp_path / "x.parquet")
    with pytest.raises(StageError) as e:
        _run(tmp_path, "  - {path: x.parquet}\n")
    assert str(e.value) == (f"{tmp_path / 'x.parquet'}: the header has two columns named "
                            "'caption' (columns 2 and 3); rename one or set "
                            "sources[0].caption_col")


def test_other_repeated_columns_and_a_real_caption_1_are_fine(tmp_path: Path) -> None:
    # 'x' twice is not ours to judge (DuckDB reads the second as x_1); a header that really
    # has 'caption' and 'caption_1' is not a repeat
    (tmp_path / "m.csv").write_text("x,url,caption,caption_1,x\n1,http://a.org/1,one,two,2\n")
    cfg, r = _run(tmp_path, "  - {path: m.csv}\n")
    assert _kept(cfg) == [("http://a.org/1", "one")]
    cfg, r = _run(tmp_path, "  - {path: m.csv, caption_col: caption_1}\n")
    assert _kept(cfg) == [("http://a.org/1", "two")]


# --- a directory as a source path -------------------------------------------------------


@pytest.mark.parametrize("path", ["data/adir.csv", "data/adir.csv/"])
def test_a_directory_as_source_path_fails_naming_it(tmp_path: Path, path: str) -> None:
    d = tmp_path / "data" / "adir.csv"
    d.mkdir(parents=True)
    (d / "part-0.csv").write_text("url,caption\nhttp://a.org/1,one\n")
    with pytest.raises(StageError) as e:
        _run(tmp_path, f"  - {{path: {path}}}\n")
    assert str(e.value) == ("sources[0].path: data/adir.csv is a directory, not a file (use a "
                            "glob such as data/adir.csv/*.csv)")
    assert not (tmp_path / "runs" / "t" / "01_ingest").exists()


def test_a_directory_hint_takes_the_files_suffix(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.jsonl.gz").write_bytes(gzip.compress(_line(1)))
    with pytest.raises(StageError) as e:
        _run(tmp_path, "  - {path: shards}\n")
    assert str(e.value).endswith("(use a glob such as shards/*.jsonl.gz)")


def test_a_glob_matching_only_directories_fails(tmp_path: Path) -> None:
    for n in ("a.csv", "b.csv"):
        (tmp_path / "data" / n).mkdir(parents=True)
    with pytest.raises(StageError) as e:
        _run(tmp_path, "  - {path: data/*.csv}\n")
    assert str(e.value) == ("sources[0].path: data/*.csv matches only directories, not files "
                            "(a.csv, b.csv)")


def test_a_glob_matching_files_and_a_directory_reads_the_files(tmp_path: Path) -> None:
    (tmp_path / "data" / "sub.csv").mkdir(parents=True)
    (tmp_path / "data" / "m.csv").write_text("url,caption\nhttp://a.org/1,one\n")
    cfg, r = _run(tmp_path, "  - {path: data/*.csv}\n")
    assert (r["files"], r["kept"]) == (1, 1)


def test_the_line_wise_sql_is_part_of_the_stage_fingerprint() -> None:
    from pipeline.stage import code_files

    assert "ingest_jsonl_lines.sql" in {p.name for p in code_files("pipeline.ingest")}
