"""Ingest on real files with real DuckDB: every format, every bad-manifest case."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.caption_fix import fix_caption
from pipeline.config import load_build
from pipeline.ledger import audit, explain
from pipeline.stage import StageError, code_files, kept_of, run_stage

ROWS = [("http://Example.COM/a.jpg", "a red apple"), ("https://x.org/b.png", "blue sky")]


def _build(tmp_path: Path, sources: str) -> Path:
    y = tmp_path / "build.yaml"
    y.write_text(f"name: t\nruns_dir: {tmp_path / 'runs'}\nsources:\n{sources}")
    return y


def _kept(cfg) -> list[tuple]:
    return duckdb.sql(f"SELECT url, caption, source FROM '{kept_of(cfg, 'ingest')}' "
                      "ORDER BY url").fetchall()


def _dropped(cfg) -> list[tuple]:
    p = kept_of(cfg, "ingest").parent / "dropped.parquet"
    return duckdb.sql(f"SELECT reason, detail FROM '{p}' ORDER BY reason").fetchall()


def _write(path: Path, fmt: str) -> None:
    if fmt == "csv":
        text = "url,caption\n" + "".join(f'{u},"{c}"\n' for u, c in ROWS)
    elif fmt == "tsv":
        text = "".join(f"{c}\t{u}\n" for u, c in ROWS)  # CC3M: no header, caption first
    elif fmt == "jsonl":
        text = "".join(json.dumps({"url": u, "caption": c}) + "\n" for u, c in ROWS)
    elif fmt == "json":
        text = json.dumps([{"url": u, "caption": c} for u, c in ROWS])
    else:
        pq.write_table(pa.table({"url": [u for u, _ in ROWS], "caption": [c for _, c in ROWS]}),
                       path)
        return
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)


@pytest.mark.parametrize("name", ["m.csv", "m.tsv", "m.jsonl", "m.json", "m.parquet",
                                  "m.csv.gz", "m.tsv.gz", "m.jsonl.gz"])
def test_each_format_reads_the_same_pairs(tmp_path: Path, name: str) -> None:
    fmt = name.split(".")[1]
    _write(tmp_path / name, fmt)
    extra = ", header: false, url_col: column1, caption_col: column0" if fmt == "tsv" else ""
    cfg = load_build(_build(tmp_path, f"  - {{path: {name}{extra}, tag: src}}\n"))
    report = run_stage(cfg, "ingest", log=lambda s: None)
    assert report["rows_in"] == 2 and report["kept"] == 2
    # Scheme and host are lower-cased; the path is left alone.
    assert _kept(cfg) == [("http://example.com/a.jpg", "a red apple", "src"),
                          ("https://x.org/b.png", "blue sky", "src")]


def test_uid_is_stable_and_depends_on_url_and_caption(tmp_path: Path) -> None:
    _write(tmp_path / "a.csv", "csv")
    cfg = load_build(_build(tmp_path, "  - {path: a.csv}\n"))
    run_stage(cfg, "ingest", log=lambda s: None)
    uids = dict(duckdb.sql(f"SELECT url, uid FROM '{kept_of(cfg, 'ingest')}'").fetchall())
    import hashlib

    want = hashlib.md5(b"http://example.com/a.jpg\x1fa red apple").hexdigest()
    assert uids["http://example.com/a.jpg"] == want


def test_captions_repaired_and_whitespace_normalized(tmp_path: Path) -> None:
    pq.write_table(pa.table({"url": ["http://a.org/1", "http://a.org/2"],
                             "caption": ["cafÃ© au lait", "  two\t\nwords   here "]}),
                   tmp_path / "m.parquet")
    cfg = load_build(_build(tmp_path, "  - {path: m.parquet}\n"))
    report = run_stage(cfg, "ingest", log=lambda s: None)
    assert [c for _, c, _ in _kept(cfg)] == ["café au lait", "two words here"]
    assert report["captions_repaired_by_ftfy"] == 1  # the whitespace is not ftfy's work


def test_a_repeated_caption_is_repaired_once(tmp_path: Path, monkeypatch) -> None:
    import pipeline.ingest as ingest

    calls = []
    monkeypatch.setattr(ingest, "fix_caption", lambda c: calls.append(c) or fix_caption(c))
    caps = ["cafÃ© au lait", "naïve art", "cafÃ© au lait", "naïve art", "cafÃ© au lait"]
    pq.write_table(pa.table({"url": [f"http://a.org/{i}" for i in range(5)], "caption": caps}),
                   tmp_path / "m.parquet")
    cfg = load_build(_build(tmp_path, "  - {path: m.parquet}\n"))
    report = run_stage(cfg, "ingest", log=lambda s: None)
    assert sorted(calls) == ["cafÃ© au lait", "naïve art"]
    assert report["captions_repaired_by_ftfy"] == 3  # rows changed, not distinct captions
    assert sorted(c for _, c, _ in _kept(cfg)) == ["café au lait"] * 3 + ["naïve art"] * 2


def test_ascii_control_characters_go_through_ftfy(tmp_path: Path) -> None:
    # ftfy removes control characters such as BEL even from an all-ASCII caption
    pq.write_table(pa.table({"url": ["http://a.org/1"], "caption": ["ring\x07 the bell"]}),
                   tmp_path / "m.parquet")
    cfg = load_build(_build(tmp_path, "  - {path: m.parquet}\n"))
    run_stage(cfg, "ingest", log=lambda s: None)
    assert [c for _, c, _ in _kept(cfg)] == ["ring the bell"]


def test_ascii_html_entities_are_repaired_too(tmp_path: Path) -> None:
    pq.write_table(pa.table({"url": ["http://a.org/1"], "caption": ["Tom &amp; Jerry"]}),
                   tmp_path / "m.parquet")
    cfg = load_build(_build(tmp_path, "  - {path: m.parquet}\n"))
    run_stage(cfg, "ingest", log=lambda s: None)
    assert [c for _, c, _ in _kept(cfg)] == ["Tom & Jerry"]


def test_bad_url_rows_dropped_with_reasons(tmp_path: Path) -> None:
    urls = ["ftp://a.org/x", "http:///nohost", "", "http://a.org/" + "x" * 3000,
            "http://a.org/has space", "file:///etc/passwd", "http://ok.org/1"]
    pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}),
                   tmp_path / "m.parquet")
    cfg = load_build(_build(tmp_path, "  - {path: m.parquet}\n"))
    r = run_stage(cfg, "ingest", log=lambda s: None)
    assert r["kept"] == 1
    assert r["dropped_by_reason"] == {"bad_url_scheme": 2, "bad_url_host": 1, "missing_url": 1,
                                      "url_too_long": 1, "bad_url_chars": 1}


def test_duplicated_rows_are_dropped_once_each(tmp_path: Path) -> None:
    text = "url,caption\nhttp://a.org/1,x y z\nhttp://A.ORG/1,x y z\nhttp://a.org/1,x y z\n"
    (tmp_path / "m.csv").write_text(text)
    cfg = load_build(_build(tmp_path, "  - {path: m.csv}\n"))
    r = run_stage(cfg, "ingest", log=lambda s: None)
    assert (r["kept"], r["dropped_by_reason"]) == (1, {"exact_repeat": 2})


def test_non_utf8_lines_are_dropped_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_bytes(
        b"url,caption\nhttp://a.org/1,fine\nhttp://a.org/2,caf\xe9 latin1\nhttp://a.org/3,ok\n")
    cfg = load_build(_build(tmp_path, "  - {path: m.csv}\n"))
    r = run_stage(cfg, "ingest", log=lambda s: None)
    assert r["rows_in"] == 3 and r["kept"] == 2
    (reason, detail), = _dropped(cfg)
    assert reason == "unreadable_row" and detail.startswith(f"{tmp_path / 'm.csv'}:3:")


@pytest.mark.parametrize("case", ["missing_file", "missing_column", "empty_file", "corrupt"])
def test_bad_manifest_fails_naming_file_and_writes_nothing(tmp_path: Path, case: str) -> None:
    p = tmp_path / "m.parquet"
    if case == "missing_column":
        pq.write_table(pa.table({"url": ["http://a.org/1"], "text": ["x"]}), p)
    elif case == "empty_file":
        p.write_bytes(b"")
    elif case == "corrupt":
        p.write_bytes(b"PAR1 this is not parquet at all")
    cfg = load_build(_build(tmp_path, "  - {path: m.parquet}\n"))
    with pytest.raises(StageError) as e:
        run_stage(cfg, "ingest", log=lambda s: None)
    assert "m.parquet" in str(e.value)
    if case == "missing_column":
        assert "'caption'" in str(e.value) and "caption_col" in str(e.value)
    assert not (tmp_path / "runs" / "t" / "01_ingest").exists()
    assert not list((tmp_path / "runs" / "t").glob(".01_ingest.tmp-*"))


def test_rerun_is_skipped_until_inputs_change(tmp_path: Path) -> None:
    _write(tmp_path / "a.csv", "csv")
    cfg = load_build(_build(tmp_path, "  - {path: a.csv}\n"))
    assert "skipped" not in run_stage(cfg, "ingest", log=lambda s: None)
    assert run_stage(cfg, "ingest", log=lambda s: None).get("skipped")
    (tmp_path / "a.csv").write_text("url,caption\nhttp://a.org/9,new row here\n")
    r = run_stage(cfg, "ingest", log=lambda s: None)
    assert "skipped" not in r and r["kept"] == 1


def test_audit_and_explain(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("url,caption\nhttp://a.org/1,one\nftp://a.org/2,two\n"
                                    "http://a.org/1,one\n")
    cfg = load_build(_build(tmp_path, "  - {path: m.csv}\n"))
    run_stage(cfg, "ingest", log=lambda s: None)
    (a,) = audit(cfg)
    assert a.ok and a.rows_in == 3 and a.kept == 1 and a.dropped == 2
    (uid, path), = explain(cfg, "ftp://a.org/2")
    assert path == [("01_ingest", "dropped: bad_url_scheme", f"ftp://a.org/2 ({tmp_path}/m.csv)")]
    # A broken ledger is caught: delete a dropped row and the audit must fail.
    d = kept_of(cfg, "ingest").parent / "dropped.parquet"
    duckdb.sql(f"COPY (SELECT * FROM '{d}' LIMIT 1) TO '{d}.x' (FORMAT parquet)")
    Path(f"{d}.x").replace(d)
    (a,) = audit(cfg)
    assert not a.ok


def test_stage_fingerprint_covers_imported_code_and_named_sql() -> None:
    # A change to ftfy's fast path or to the ingest SQL must rerun ingest, not reuse old output.
    files = {str(p.relative_to(Path(__file__).parents[1])) for p in code_files("pipeline.ingest")}
    assert {"pipeline/ingest.py", "pipeline/caption_fix.py", "pipeline/sql/ingest_stage.sql",
            "pipeline/stage.py"} <= files
    assert not any(f.endswith("balance_match.sql") for f in files)  # not named by ingest
    url = {p.name for p in code_files("dedup.url")}
    assert {"url_canonical.sql", "url_keys.sql", "url_candidates.sql", "url_compare.sql"} <= url


def test_a_pair_is_never_an_exact_repeat_of_a_dropped_row(tmp_path: Path) -> None:
    # The first row is dropped (a raw newline in the URL). Its normal form used to stop at
    # the newline, 'http://a.org', so the good row after it became its "exact_repeat" and the
    # pair was lost. Now the URL is normalized whole and dropped rows rank no repeats.
    pq.write_table(pa.table({"url": ["http://A.org/x\nmore", "http://a.org", "http://a.org"],
                             "caption": ["same caption", "same caption", "same caption"]}),
                   tmp_path / "m.parquet")
    cfg = load_build(_build(tmp_path, "  - {path: m.parquet}\n"))
    run_stage(cfg, "ingest", log=lambda s: None)
    assert _kept(cfg) == [("http://a.org", "same caption", "m")]
    assert [r for r, _ in _dropped(cfg)] == ["bad_url_chars", "exact_repeat"]


@pytest.mark.parametrize("url, norm", [
    ("http://a.org/Path?Q=1#F", "http://a.org/Path?Q=1#F"),  # plain: its own normal form
    ("HTTPS://User@A.Example.ORG:8443/P", "https://user@a.example.org:8443/P"),
    ("http://u:p@host.com:80/x", "http://u:p@host.com:80/x"),
    ("http://[::1]:8080/x", "http://[::1]:8080/x"),
])
def test_url_normal_form_lowercases_scheme_and_authority_only(tmp_path: Path, url: str,
                                                               norm: str) -> None:
    pq.write_table(pa.table({"url": [url], "caption": ["a caption"]}), tmp_path / "m.parquet")
    cfg = load_build(_build(tmp_path, "  - {path: m.parquet}\n"))
    run_stage(cfg, "ingest", log=lambda s: None)
    assert [u for u, _, _ in _kept(cfg)] == [norm]


def test_a_repaired_caption_repeats_the_clean_one_across_files(tmp_path: Path) -> None:
    # File 2 holds the clean pair, file 1 its mojibake twin: after ftfy they are one pair, and
    # the first file in build order keeps it. The repair must be applied before repeats are
    # looked for, and the staged parts must not stay in the stage's folder.
    pq.write_table(pa.table({"url": ["http://a.org/1", "http://a.org/2"],
                             "caption": ["cafÃ© au lait", "tea"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"url": ["http://a.org/1", "http://a.org/3"],
                             "caption": ["café au lait", "tea"]}), tmp_path / "b.parquet")
    cfg = load_build(_build(tmp_path, "  - {path: a.parquet}\n  - {path: b.parquet}\n"))
    report = run_stage(cfg, "ingest", log=lambda s: None)
    assert _kept(cfg) == [("http://a.org/1", "café au lait", "a"), ("http://a.org/2", "tea", "a"),
                          ("http://a.org/3", "tea", "b")]
    assert _dropped(cfg) == [("exact_repeat", "same url and caption as an earlier row "
                                              f"({tmp_path / 'b.parquet'})")]
    assert report["captions_repaired_by_ftfy"] == 1
    assert sorted(p.name for p in kept_of(cfg, "ingest").parent.iterdir()) == [
        "_SUCCESS", "dropped.parquet", "kept.parquet", "report.json"]
