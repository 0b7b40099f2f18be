"""URL canonicalization and url+caption dedup on real DuckDB and real Parquet, after a
real ingest and text filter run; conservation across ingest → text_filter → url_dedup."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from dedup.url import canonical_urls
from pipeline.config import UrlDedupConfig, load_build
from pipeline.ledger import audit
from pipeline.stage import get_spec, kept_of, run_stage, stage_dir

STRIP = UrlDedupConfig().strip_params


@pytest.mark.parametrize("url, canonical", [
    ("http://Example.COM/a.jpg", "http://example.com/a.jpg"),
    ("HTTPS://x.org/A/B.JPG", "https://x.org/A/B.JPG"),  # the path keeps its case
    ("http://x.org:80/a", "http://x.org/a"),
    ("https://x.org:443/a", "https://x.org/a"),
    ("http://x.org:443/a", "http://x.org:443/a"),  # not the default port for http
    ("https://x.org:8443/a", "https://x.org:8443/a"),
    ("http://x.org:/a", "http://x.org/a"),
    ("http://x.org", "http://x.org/"),
    ("http://x.org/a#top", "http://x.org/a"),
    ("http://x.org/a?", "http://x.org/a"),
    ("http://x.org/a?#", "http://x.org/a"),
    ("http://x.org/a?utm_source=tw&utm_medium=social", "http://x.org/a"),
    ("http://x.org/a?id=3&UTM_Campaign=x&fbclid=abc", "http://x.org/a?id=3"),
    ("http://x.org/a?gclid&b=2", "http://x.org/a?b=2"),
    ("http://x.org/a?b=1&&c=2&", "http://x.org/a?b=1&c=2"),
    ("http://x.org/a?c=2&b=1", "http://x.org/a?c=2&b=1"),  # order kept
    ("http://x.org/a?x=utm_source", "http://x.org/a?x=utm_source"),  # only names strip
    ("http://x.org/img.jpg", "http://x.org/img.jpg"),
])
def test_canonical_url(url: str, canonical: str) -> None:
    assert canonical_urls(duckdb.connect(), [url], STRIP) == [canonical]


def test_strip_params_come_from_the_config() -> None:
    con = duckdb.connect()
    assert canonical_urls(con, ["http://x.org/a?sid=1&k=2"], ["SID"]) == ["http://x.org/a?k=2"]
    assert canonical_urls(con, ["http://x.org/a?sid=1&k=2"], []) == ["http://x.org/a?sid=1&k=2"]


def _run(tmp_path: Path, rows: list[tuple[str, str]], extra: str = "") -> object:
    csv = "url,caption\n" + "".join(f'{u},"{c}"\n' for u, c in rows)
    (tmp_path / "m.csv").write_text(csv)
    (tmp_path / "b.yaml").write_text(
        f"name: t\nruns_dir: {tmp_path / 'runs'}\nsources:\n  - path: m.csv\n"
        f"text_filter:\n  filters: [caption_length]\n{extra}")
    cfg = load_build(tmp_path / "b.yaml")
    for stage in ("ingest", "text_filter", "url_dedup"):
        run_stage(cfg, stage, log=lambda s: None)
    return cfg


def test_duplicates_drop_with_the_survivor_uid_and_non_duplicates_survive(
        tmp_path: Path) -> None:
    cap = "a red apple on a table"
    rows = [
        ("http://shop.org/apple.jpg", cap),                           # survivor: shortest url
        ("http://shop.org/apple.jpg?utm_source=news&utm_medium=m", cap),  # tracking params
        ("http://SHOP.org:80/apple.jpg#zoom", cap),                   # case, port, fragment
        ("http://shop.org/apple.jpg?", cap),                          # trailing '?'
        ("http://shop.org/apple.jpg", "a green apple on a table"),    # another caption
        ("http://shop.org/apple.jpg?size=big", cap),                  # a real parameter
        ("https://shop.org/apple.jpg", cap),                          # another scheme
        ("http://shop.org/Apple.jpg", cap),                           # path case matters
        ("http://shop.org:8080/apple.jpg", cap),                      # another port
        ("http://other.org/a.jpg?ref=x", "blue sky over the sea"),
        ("http://other.org/a.jpg?ref=y", "blue sky over the sea"),    # ref is stripped
    ]
    cfg = _run(tmp_path, rows)
    kept = duckdb.sql(f"SELECT uid, url, caption FROM '{kept_of(cfg, 'url_dedup')}'").fetchall()
    kept_urls = sorted((u, c) for _, u, c in kept)
    assert kept_urls == sorted([rows[0], rows[4], rows[5], rows[6], rows[7], rows[8],
                                ("http://other.org/a.jpg?ref=x", "blue sky over the sea")])
    dropped = duckdb.sql(
        f"SELECT uid, reason, detail FROM "
        f"'{stage_dir(cfg, get_spec('url_dedup')) / 'dropped.parquet'}'").fetchall()
    assert len(dropped) == 4 and {r[1] for r in dropped} == {"duplicate_url_caption"}
    uid_of = {(u, c): uid for uid, u, c in kept}
    details = sorted(r[2] for r in dropped)
    assert details == sorted([uid_of[rows[0]]] * 3
                             + [uid_of[("http://other.org/a.jpg?ref=x", rows[9][1])]])


def test_survivor_does_not_depend_on_row_order(tmp_path: Path) -> None:
    cap = "a red apple on a table"
    rows = [("http://a.org/x.jpg?utm_source=1", cap), ("http://a.org/x.jpg?utm_source=22", cap),
            ("http://A.org/x.jpg#f", cap)]
    survivors = []
    for i, order in enumerate((rows, rows[::-1])):
        (tmp_path / str(i)).mkdir()
        cfg = _run(tmp_path / str(i), order)
        survivors.append(duckdb.sql(f"SELECT url FROM '{kept_of(cfg, 'url_dedup')}'").fetchall())
    assert survivors[0] == survivors[1] == [("http://a.org/x.jpg#f",)]


def test_conservation_across_ingest_filter_and_dedup(tmp_path: Path) -> None:
    rows = [(f"http://h{i % 7}.org/{i % 13}.jpg?utm_source={i}", f"picture number {i % 5} here")
            for i in range(200)] + [("http://h.org/x.jpg", "two words")]
    cfg = _run(tmp_path, rows)
    results = audit(cfg)  # uid-exact: each input uid kept or dropped exactly once
    assert [a.folder for a in results] == ["01_ingest", "02_text_filter", "03_url_dedup"]
    assert all(a.ok for a in results), [a.problems for a in results]
    ingest, text, dedup = results
    assert (ingest.kept, text.rows_in, text.kept, text.dropped) == (201, 201, 200, 1)
    assert dedup.rows_in == dedup.kept + dedup.dropped == 200
    # i mod 7 (host), i mod 13 (path), i mod 5 (caption): the distinct (url, caption) pairs
    assert dedup.kept == len({(i % 7, i % 13, i % 5) for i in range(200)})


def _ledger(cfg: object) -> list[tuple]:
    folder = stage_dir(cfg, get_spec("url_dedup"))
    return duckdb.sql(f"SELECT uid, reason, detail FROM '{folder / 'dropped.parquet'}' "
                      "ORDER BY uid").fetchall()


def test_the_exact_comparison_in_hash_parts_gives_the_one_part_answer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [(f"http://h{i % 3}.org/{i % 4}.jpg?utm_source={i}", f"picture number {i % 5} here")
            for i in range(300)]  # 60 distinct pairs
    (tmp_path / "one").mkdir()
    whole = _run(tmp_path / "one", rows)
    # parts of 10 candidates instead of half the 4 GB default memory limit
    monkeypatch.setattr("pipeline.parts.MIN_PART_ROWS", 10)
    monkeypatch.setattr("pipeline.parts.PART_MEMORY_SHARE", 1e-9)
    (tmp_path / "split").mkdir()
    split = _run(tmp_path / "split", rows)
    one_report, split_report = (
        json.loads((stage_dir(c, get_spec("url_dedup")) / "report.json").read_text())
        for c in (whole, split))
    assert one_report["compare_parts"] == 1
    assert split_report["candidates"] == 300 and split_report["compare_parts"] == 30
    assert _ledger(split) == _ledger(whole) and len(_ledger(whole)) == 300 - 60
    assert not any(p.name.startswith("_url") for p in stage_dir(split, get_spec("url_dedup"))
                   .iterdir())
