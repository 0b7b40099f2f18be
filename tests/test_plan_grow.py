"""witforge plan's second calibration point for a small pilot: each stage runs again on its
pilot input repeated (pipeline/plan_grow.py). Every copy must hold the pilot's own repeats,
URL duplicates and unreadable lines and no more, or the repeated run would measure other
work than the pilot's; the fit must then pass through both runs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_build
from pipeline.plan import plan_build
from pipeline.plan_grow import GROWN_ROWS, MIN_COPIES, copies_for, fit_grown
from pipeline.plan_measure import calibrate, read_pilot
from pipeline.stage import run_stage

STAGES = ["ingest", "text_filter", "url_dedup"]


def _pilot(tmp_path: Path) -> Path:
    """Three sources (TSV with a header and a bad UTF-8 line, JSON Lines, Parquet) with exact
    repeats within and across files, URL variants that url_dedup folds, mojibake, and
    captions text_filter drops."""
    tsv = ["url\tcaption"]
    for i in range(120):
        url = f"http://Site{i % 7}.example/img/{i}.jpg"
        tsv.append(f"{url}\ta photo of thing {i}" if i % 9 else f"{url}\tcafÃ© {i}")
    tsv += [tsv[5], tsv[6]]  # exact repeats
    tsv.append("http://site1.example/tracked.jpg?utm_source=x\ta tracked photo")
    tsv.append("http://site1.example/tracked.jpg\ta tracked photo")  # url_dedup folds these
    tsv.append("http://site2.example/junk.jpg\tIMG_1234.jpg")  # text_filter drops it
    data = ("\n".join(tsv) + "\n").encode() + b"http://site3.example/x.jpg\tbad \xff bytes\n"
    (tmp_path / "a.tsv").write_bytes(data)
    lines = [json.dumps({"url": f"http://web{i % 3}.example/p/{i}.png", "caption":
                         f"a web picture {i}"}) for i in range(50)]
    lines.append(json.dumps({"url": "http://Site1.example/img/1.jpg",
                             "caption": "a photo of thing 1"}))  # repeats a TSV pair
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"URL": [f"http://pq.example/{i % 40}.jpg" for i in range(60)],
                             "TEXT": [f"a parquet caption {i % 40}" for i in range(60)]}),
                   tmp_path / "c.parquet")
    y = tmp_path / "b.yaml"
    y.write_text(f"name: grow\nruns_dir: {tmp_path / 'runs'}\nsources:\n"
                 "  - {path: a.tsv, format: tsv}\n  - {path: b.jsonl}\n"
                 "  - {path: c.parquet, url_col: URL, caption_col: TEXT}\n"
                 "text_filter: {filters: [junk_caption]}\n")
    return y


@pytest.fixture(scope="module")
def pilot(tmp_path_factory):
    y = _pilot(tmp_path_factory.mktemp("grow"))
    cfg = load_build(y)
    reports = {s: run_stage(cfg, s, log=lambda _: None) for s in STAGES}
    p = read_pilot(cfg)
    calibrate(p)
    return cfg, reports, {m.name: m for m in p.stages}


def test_every_copy_holds_the_pilots_drops_and_no_more(pilot):
    _, reports, stages = pilot
    r = reports["ingest"]
    assert r["dropped_by_reason"].get("exact_repeat", 0) >= 3  # the fixture is what it says
    assert r["dropped_by_reason"].get("unreadable_row", 0) == 1
    assert reports["url_dedup"]["dropped"] >= 1 and reports["text_filter"]["dropped"] >= 1
    for name in STAGES:
        grown = stages[name].calibration["grown"]
        copies = grown["copies"]
        assert copies == copies_for(r["rows_in"] if name == "ingest" else
                                    reports[name]["rows_in"]) >= MIN_COPIES
        assert grown["rows"] == copies * reports[name]["rows_in"], name
        # copies that met each other would drop more; broken duplicates would keep more
        assert grown["kept"] == copies * reports[name]["kept"], name
        assert grown["rows"] <= GROWN_ROWS


def test_the_fit_passes_through_the_pilot_and_its_repeated_run(pilot):
    cfg, reports, stages = pilot
    plan = plan_build(cfg, 10 * reports["ingest"]["rows_in"])  # calibrates again
    rows = {r["stage"]: r for r in plan["stages"]}
    for name in ("text_filter", "url_dedup"):  # no per-key part
        m, row = stages[name], rows[name]
        grown = row["calibration"]["grown"]
        for fixed, per_row, key, pilot_total in (
                ("fixed_seconds", "seconds_per_row", "seconds", m.seconds),
                ("cpu_fixed_seconds", "cpu_seconds_per_row", "cpu_seconds", m.cpu_seconds)):
            f, v = row[fixed], row[per_row]
            if f > 0:  # else the pilot was slower than the line through 0: clamped
                assert f + v * m.rows_in == pytest.approx(pilot_total, abs=2e-3)
                assert f + v * grown["rows"] == pytest.approx(grown[key], abs=2e-3)
        assert not any("upper bound" in n for n in row["notes"]), name
        assert any("repeated" in n for n in row["notes"]), name


def test_fit_grown_keeps_per_key_seconds_out_of_the_span():
    # pilot: 1,000 rows in 0.30 s, 0.05 s of them per distinct key; the repeated run: 100,000
    # rows in 1.29 s, with the same keys (0.05 s) again
    fixed, per_row = fit_grown(1000, 0.30, {"rows": 100_000, "seconds": 1.29}, "seconds",
                               0.05, 0.05)
    slope = (1.24 - 0.25) / 99_000
    assert per_row == pytest.approx(slope + 0.05 / 1000)
    assert fixed == pytest.approx(0.25 - slope * 1000)
    assert fit_grown(1000, 0.3, {"rows": 500, "seconds": 0.1}, "seconds") is None
    assert copies_for(GROWN_ROWS) == 0 and copies_for(1000) == GROWN_ROWS // 1000


def test_url_dedups_split_is_timed_and_priced_where_the_target_needs_it(pilot):
    """A pilot's few candidates are compared in one part; the calibration times the same
    input compared in 4 hash parts (written out first), which must give the same answer, and
    the plan adds that cost per candidate only where the target's candidates need parts."""
    cfg, reports, stages = pilot
    split = stages["url_dedup"].calibration["split"]
    one, four = split["parts_1"], split["parts_4"]
    assert (one["compare_parts"], four["compare_parts"]) == (1, 4)
    assert one["kept"] == four["kept"] and one["candidates"] == four["candidates"] > 0
    p = read_pilot(cfg)
    p_stages = {m.name: m for m in p.stages}
    for m in p.stages:
        m.calibration = stages[m.name].calibration
    from pipeline.plan import project
    from pipeline.plan_model import Cluster

    cl = Cluster(1, 2, 0, None, None)
    small, big = (next(r for r in project(p, n, cl)["stages"] if r["stage"] == "url_dedup")
                  for n in (10 * reports["ingest"]["rows_in"], 10**9))
    assert not any("hash parts" in n for n in small["notes"])
    assert any("hash parts, written out first" in n for n in big["notes"])
    p_stages["url_dedup"].calibration = {**stages["url_dedup"].calibration, "split": None}
    plain = next(r for r in project(p, 10**9, cl)["stages"] if r["stage"] == "url_dedup")
    rows_in = big["rows_in"]
    per_cand = max(0.0, four["cpu_seconds"] - one["cpu_seconds"]) / four["candidates"]
    at = reports["url_dedup"]["candidates"] / reports["url_dedup"]["rows_in"] * rows_in
    assert big["cpu_seconds"] - plain["cpu_seconds"] == pytest.approx(per_cand * at, rel=1e-3,
                                                                      abs=1e-3)
