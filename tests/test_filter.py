"""Named SQL filters on real DuckDB: each shipped filter on rows that must pass and rows
that must drop, the stage on real Parquet (ledger, order, NULLs, conservation), preview."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, load_build
from pipeline.filter import (
    apply_filters,
    columns_needed,
    load_filter,
    main,
    resolve_filter,
    shipped_filters,
)
from pipeline.sandbox import open_sandbox
from pipeline.stage import StageError, get_spec, kept_of, run_stage, stage_dir


def _fate(rows: list[dict], names: list[str], variables: dict | None = None) -> dict[str, tuple]:
    """uid -> (reason, detail) for dropped rows, 'kept' otherwise."""
    con = open_sandbox(None, {"pairs": pa.Table.from_pylist(rows)}, variables or {})
    dropped = apply_filters(con, [resolve_filter(None, n) for n in names], "test")
    by_uid = {r["uid"]: (r["reason"], r["detail"]) for r in dropped.to_pylist()}
    return {r["uid"]: by_uid.get(r["uid"], "kept") for r in rows}


def _captions(caps: list[str | None]) -> list[dict]:
    return [{"uid": f"u{i}", "url": f"http://h.org/{i}.jpg", "caption": c, "source": "s"}
            for i, c in enumerate(caps)]


def _check_filter(name: str, keep: list, drop: list, variables: dict | None = None,
                  rows_of=_captions) -> None:
    rows = rows_of(keep + drop)
    fate = _fate(rows, [name], variables)
    for i, value in enumerate(keep + drop):
        expected = "kept" if i < len(keep) else name
        got = fate[f"u{i}"]
        assert (got if got == "kept" else got[0]) == expected, f"{name}: {value!r} → {got}"


def test_shipped_filters_are_listed() -> None:
    assert {"caption_length", "junk_caption", "english", "min_image_side", "aspect_ratio",
            "frequent_caption"} <= set(shipped_filters())


def test_caption_length() -> None:
    _check_filter("caption_length",
                  keep=["a red apple", "dog on grass", "  three short words  ", "a b cd",
                        "日本 の 夜景", "a\tb  c d"],
                  drop=["two words", "a b c", "  a b c  ", "日 本 語", "hi", "", "   ",
                        "abcdefghijkl"])


def test_caption_length_null_drops_with_null_detail() -> None:
    fate = _fate(_captions(["a red apple", None]), ["caption_length"])
    assert fate == {"u0": "kept", "u1": ("caption_length", "null")}


def test_junk_caption() -> None:
    _check_filter("junk_caption",
                  keep=["a red apple on a table", "Photo of a cat sleeping", "The 2019 season",
                        "Imagine dragons concert", "file cabinet in an office"],
                  drop=["IMG_1234.jpg", "DSC01234", "my holiday photo.JPEG", "IMG 2020-01-01",
                        "see https://example.com/x", "visit www.shop.com now",
                        "Click here to enlarge", "image not found", "12/03/2020 - 15:00",
                        "!!! ???", "#1"])


def test_english() -> None:
    _check_filter("english",
                  keep=["A beautiful sunset over the mountains", "a dog running on the beach",
                        "Vintage wooden chair with a blue cushion"],
                  drop=["le chat noir dort sur le toit de la maison",
                        "Ein roter Apfel liegt auf dem Tisch in der Küche",
                        "Il gatto nero dorme sul tetto della casa", "東京の夜景と桜の花"])


def _sizes(dims: list) -> list[dict]:
    return [{"uid": f"u{i}", "url": "u", "caption": "c", "width": w, "height": h,
             "original_width": ow, "original_height": oh}
            for i, (w, h, ow, oh) in enumerate(dims)]


def test_min_image_side_uses_original_size_and_variable() -> None:
    _check_filter("min_image_side",
                  keep=[(256, 256, 400, 300), (200, 200, None, None), (64, 64, 300, 5000)],
                  drop=[(256, 256, 150, 900), (100, 100, None, None), (256, 256, 0, 0)],
                  variables={"min_side": 200}, rows_of=_sizes)


def test_aspect_ratio() -> None:
    _check_filter("aspect_ratio",
                  keep=[(1, 1, 300, 900), (1, 1, 900, 300), (1, 1, 500, 500)],
                  drop=[(1, 1, 301, 1000), (1, 1, 1000, 200), (1, 1, 0, 100)],
                  variables={"max_aspect_ratio": 3.0}, rows_of=_sizes)


def test_missing_size_drops_as_null() -> None:
    fate = _fate(_sizes([(None, None, None, None)]), ["min_image_side"], {"min_side": 10})
    assert fate["u0"] == ("min_image_side", "null")


def test_frequent_caption_is_a_query_filter() -> None:
    f = resolve_filter(None, "frequent_caption")
    assert f.is_query
    rows = [{"uid": f"u{i}", "url": f"http://h.org/{i}", "caption": "Logo", "source": "s"}
            for i in range(3)]
    rows += [{"uid": "x0", "url": "http://h.org/a", "caption": "a red apple", "source": "s"},
             {"uid": "x1", "url": "http://h.org/b", "caption": "a red apple", "source": "s"}]
    fate = _fate(rows, ["frequent_caption"], {"max_caption_repeats": 2})
    assert [fate[f"u{i}"] for i in range(3)] == [("frequent_caption", "false")] * 3
    assert fate["x0"] == fate["x1"] == "kept"


def test_only_the_columns_filters_name_are_loaded(tmp_path: Path) -> None:
    cols = ["uid", "url", "caption", "source", "width"]
    text = [resolve_filter(None, n) for n in ("caption_length", "junk_caption")]
    assert columns_needed(text, cols) == ["caption"]
    assert columns_needed(text + [resolve_filter(None, "frequent_caption")], cols) == [
        "uid", "url", "caption"]
    (tmp_path / "star.sql").write_text("SELECT * FROM pairs WHERE width > 3")
    assert columns_needed([load_filter(tmp_path / "star.sql")], cols) == cols
    (tmp_path / "lit.sql").write_text("regexp_matches(caption, 'a*b')")
    assert columns_needed([load_filter(tmp_path / "lit.sql")], cols) == ["caption"]


def test_first_failing_filter_in_list_order_records_the_drop() -> None:
    rows = _captions(["IMG_1234.jpg", "visit www.example.com now", "le chat noir sur le toit"])
    a = _fate(rows, ["caption_length", "junk_caption", "english"])
    b = _fate(rows, ["junk_caption", "caption_length", "english"])
    assert a["u0"] == ("caption_length", "false")
    assert a["u1"] == ("junk_caption", "false")
    assert a["u2"] == ("english", "false")
    assert b["u0"] == ("junk_caption", "false")  # fails both: the first listed records it
    assert b["u2"] == ("english", "false")


# ---- the stage on real files ----------------------------------------------------------------

def mark_done(cfg, stage: str, rows: list[dict]) -> Path:
    """Make ``stage`` look finished with ``rows`` as its kept.parquet."""
    d = stage_dir(cfg, get_spec(stage))
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), d / "kept.parquet")
    (d / "report.json").write_text(json.dumps({"fingerprint": f"fx-{len(rows)}"}))
    (d / "_SUCCESS").write_text("")
    return d / "kept.parquet"


def _build(tmp_path: Path, extra: str) -> Path:
    (tmp_path / "m.csv").write_text("url,caption\nhttp://h.org/a.jpg,a red apple\n")
    y = tmp_path / "build.yaml"
    y.write_text(f"name: t\nruns_dir: {tmp_path / 'runs'}\nsources:\n  - path: m.csv\n{extra}")
    return y


def _ledger(cfg, stage: str) -> list[tuple]:
    p = stage_dir(cfg, get_spec(stage)) / "dropped.parquet"
    return duckdb.sql(f"SELECT uid, stage, reason, detail FROM '{p}' ORDER BY uid").fetchall()


def test_text_filter_stage_after_real_ingest(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "no_cats.sql").write_text(
        "-- my own filter\nNOT contains(lower(caption), 'cat') -- trailing comment\n")
    rows = ["http://h.org/1.jpg,a red apple on a table",
            "http://h.org/2.jpg,IMG_1234.jpg",
            "http://h.org/3.jpg,two words",
            "http://h.org/4.jpg,a black cat on a red sofa",
            "http://h.org/5.jpg,le chat noir dort sur le toit de la maison",
            "http://h.org/6.jpg,Click here to see the full size image",
            "http://h.org/7.jpg,a red apple on a table",
            "http://h.org/8.jpg,A red apple on a table"]
    y = _build(tmp_path, "text_filter:\n  filters: [caption_length, junk_caption, "
               "mine/no_cats.sql, english, frequent_caption]\n  max_caption_repeats: 1\n"
               "url_dedup:\n  enabled: false\n")
    (tmp_path / "m.csv").write_text("url,caption\n" + "\n".join(rows) + "\n")
    cfg = load_build(y)
    run_stage(cfg, "ingest", log=lambda s: None)
    report = run_stage(cfg, "text_filter", log=lambda s: None)
    kept = duckdb.sql(f"SELECT url, caption, source FROM '{kept_of(cfg, 'text_filter')}'"
                      ).fetchall()
    assert kept == []  # the apple is on 3 urls: frequent_caption (max 1) drops all three
    reasons = sorted(r[2] for r in _ledger(cfg, "text_filter"))
    assert reasons == ["caption_length", "caption_length", "english", "frequent_caption",
                       "frequent_caption", "frequent_caption", "junk_caption", "no_cats"]
    assert report["rows_in"] == 8 == report["kept"] + report["dropped"]
    assert report["dropped_by_filter"]["no_cats"] == 1
    assert {r[1] for r in _ledger(cfg, "text_filter")} == {"text_filter"}
    # editing the user's filter file makes the stage run again instead of being skipped
    (tmp_path / "mine" / "no_cats.sql").write_text("NOT contains(caption, 'apple')\n")
    again = run_stage(cfg, "text_filter", log=lambda s: None)
    assert not again.get("skipped") and again["dropped_by_filter"]["no_cats"] == 3
    uids = duckdb.sql(f"SELECT uid FROM '{kept_of(cfg, 'ingest')}' ORDER BY uid").fetchall()
    kept_uids = duckdb.sql(f"SELECT uid FROM '{kept_of(cfg, 'text_filter')}'").fetchall()
    assert sorted([(u,) for u, *_ in _ledger(cfg, "text_filter")] + kept_uids) == uids


def test_image_filter_stage_carries_every_column(tmp_path: Path) -> None:
    y = _build(tmp_path, "image_filter:\n  filters: [min_image_side, aspect_ratio]\n"
               "  min_side: 100\n")
    cfg = load_build(y)
    rows = _sizes([(64, 64, 120, 120), (64, 64, 90, 200), (64, 64, 100, 400),
                   (None, None, None, 500)])
    for r in rows:
        r.update(sha256="ab" * 32, source="s", tar="t.tar", key=r["uid"])
    mark_done(cfg, "crawl", rows)
    run_stage(cfg, "image_filter", log=lambda s: None)
    kept = pq.read_table(kept_of(cfg, "image_filter"))
    assert kept.column("uid").to_pylist() == ["u0"]
    assert set(kept.column_names) == set(rows[0])
    assert [r[2:] for r in _ledger(cfg, "image_filter")] == [
        ("min_image_side", "false"), ("aspect_ratio", "false"), ("min_image_side", "null")]


def test_no_filters_passes_everything(tmp_path: Path) -> None:
    cfg = load_build(_build(tmp_path, ""))
    mark_done(cfg, "ingest", _captions(["x", None]))
    r = run_stage(cfg, "text_filter", log=lambda s: None)
    assert (r["kept"], r["dropped"]) == (2, 0)


def test_bad_filters_fail_naming_the_filter(tmp_path: Path) -> None:
    (tmp_path / "typo.sql").write_text("length(captoin) > 5")
    (tmp_path / "notbool.sql").write_text("length(caption)")
    (tmp_path / "nouid.sql").write_text("SELECT url FROM pairs")
    (tmp_path / "two.sql").write_text("SELECT uid FROM pairs; SELECT uid FROM pairs")
    for name, msg in (("typo", "captoin"), ("notbool", "expected BOOLEAN"),
                      ("nouid", "must return a column uid"), ("two", "exactly one SELECT")):
        cfg = load_build(_build(tmp_path, f"text_filter:\n  filters: [{name}.sql]\n"))
        mark_done(cfg, "ingest", _captions(["a red apple"]))
        with pytest.raises((StageError, ConfigError), match=msg) as e:
            run_stage(cfg, "text_filter", log=lambda s: None)
        assert name in str(e.value)
    with pytest.raises(ConfigError, match="not a shipped filter"):
        resolve_filter(None, "no_such_filter")


def test_preview_counts_and_examples(tmp_path: Path, capsys) -> None:
    cfg = load_build(_build(tmp_path, ""))
    mark_done(cfg, "ingest", _captions(["a red apple", "two words", "hi", None]))
    assert main(["caption_length", "--build", str(cfg.path), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 rows: 1 kept (25.0 %), 2 dropped (false), 1 dropped (NULL)" in out
    assert "a red apple" in out
    assert not (stage_dir(cfg, get_spec("text_filter"))).exists()


def test_preview_through_the_cli(tmp_path: Path, capsys) -> None:
    from pipeline.cli import main as cli_main

    cfg = load_build(_build(tmp_path, ""))
    # before ingest ran: a clear error, exit code 2, nothing written
    assert cli_main(["preview", "caption_length", "--build", str(cfg.path)]) == 2
    assert "needs stage ingest first" in capsys.readouterr().err
    mark_done(cfg, "ingest", _captions(["a red apple", "IMG_1234.jpg"]))
    (tmp_path / "mine.sql").write_text("NOT contains(caption, 'apple')")
    assert cli_main(["preview", str(tmp_path / "mine.sql"), "--build", str(cfg.path)]) == 0
    out = capsys.readouterr().out
    assert "filter mine" in out and "2 rows: 1 kept (50.0 %), 1 dropped (false)" in out


def test_a_later_filter_only_sees_the_survivors_of_earlier_ones(tmp_path: Path) -> None:
    seen = [0]

    def counting(col: pa.Array) -> pa.Array:
        seen[0] += len(col)
        return pa.array([True] * len(col))

    con = duckdb.connect()
    con.create_function("counting", counting, ["VARCHAR"], "BOOLEAN", type="arrow")
    con.execute("CREATE TABLE pairs AS SELECT i::VARCHAR uid, 'c' || i caption "
                "FROM range(50000) t(i)")
    (tmp_path / "cheap.sql").write_text("uid LIKE '%7'")
    (tmp_path / "costly.sql").write_text("counting(caption)")
    dropped = apply_filters(con, [load_filter(tmp_path / "cheap.sql"),
                                  load_filter(tmp_path / "costly.sql")], "t")
    assert dropped.num_rows == 45000
    assert seen[0] == 5000  # the costly filter ran on the 10 % the cheap one kept
    con.close()


def _split_build(tmp_path: Path, filters: str) -> Path:
    """20,000 ingested pairs (about 1.4 MB of captions)."""
    words = ["red", "apple", "cat", "on", "a", "table", "IMG_0042.jpg", "sofa", "old", "map"]
    captions = [f"click here for photo {i}" if i % 50 == 0 else f"two w{i}" if i % 50 == 1 else
                " ".join(words[(i * k) % len(words)] for k in range(1 + i % 13))
                + f" no {i} " + "x" * (i % 90) for i in range(20_000)]
    rows = [f"http://h{i % 97}.org/{i}.jpg,{c}" for i, c in enumerate(captions)]
    y = _build(tmp_path, f"text_filter:\n  filters: [{filters}]\nurl_dedup:\n  enabled: false\n")
    (tmp_path / "m.csv").write_text("url,caption\n" + "\n".join(rows) + "\n")
    return y


def test_row_local_filters_run_in_parts_with_the_whole_input_answer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # parts of ~400 KB (1e-4 of the 4 GB default memory limit) instead of 2 GB
    monkeypatch.setattr("pipeline.parts.MIN_PART_ROWS", 1_000)
    monkeypatch.setattr("pipeline.parts.PART_MEMORY_SHARE", 1e-4)
    (tmp_path / "no_cats.sql").write_text("NOT contains(caption, 'cat')")
    cfg = load_build(_split_build(tmp_path, "caption_length, junk_caption, no_cats.sql"))
    run_stage(cfg, "ingest", log=lambda s: None)
    report = run_stage(cfg, "text_filter", log=lambda s: None)
    assert report["parts"] >= 3
    # the same filters over the whole input in one sandbox
    whole = open_sandbox(None, {"pairs": kept_of(cfg, "ingest")})
    expected = apply_filters(whole, [resolve_filter(cfg, n) for n in
                                     ("caption_length", "junk_caption", "no_cats.sql")], "x")
    want = sorted((r["uid"], r["reason"], r["detail"]) for r in expected.to_pylist())
    got = [(u, reason, detail) for u, _, reason, detail in _ledger(cfg, "text_filter")]
    assert got == want and {r[1] for r in got} == {"caption_length", "junk_caption", "no_cats"}
    assert report["kept"] == 20_000 - len(want) > 0


def test_a_condition_over_other_rows_sees_the_whole_input(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # parts of ~400 KB (1e-4 of the 4 GB default memory limit) instead of 2 GB
    monkeypatch.setattr("pipeline.parts.MIN_PART_ROWS", 1_000)
    monkeypatch.setattr("pipeline.parts.PART_MEMORY_SHARE", 1e-4)
    # drops the longest caption(s) of the input; split in parts it would drop each part's
    (tmp_path / "not_longest.sql").write_text(
        "length(caption) < (SELECT max(length(caption)) FROM pairs)")
    cfg = load_build(_split_build(tmp_path, "not_longest.sql"))
    run_stage(cfg, "ingest", log=lambda s: None)
    report = run_stage(cfg, "text_filter", log=lambda s: None)
    longest = duckdb.sql(f"SELECT count(*) FROM '{kept_of(cfg, 'ingest')}' WHERE length(caption)"
                         f" = (SELECT max(length(caption)) FROM '{kept_of(cfg, 'ingest')}')"
                         ).fetchall()[0][0]
    assert report["parts"] == 1 and report["dropped"] == longest
