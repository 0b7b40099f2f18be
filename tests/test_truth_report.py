"""The truth report: per stage and kind of row, what reached the stage and what it dropped,
from the real ledger of a real ingest + text_filter + url_dedup run."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import load_build
from pipeline.stage import run_stage
from pipeline.truth_report import arms_markdown, curation_truth, markdown, write_truth

QUIET = {"log": lambda s: None}
ROWS = [  # url, caption, kind
    ("http://127.0.0.1/a.jpg", "a red fox in the snow", "clean"),
    ("http://127.0.0.1/b.jpg", "two ducks on a lake", "clean"),
    ("http://127.0.0.1/c.jpg", "click here", "junk_boilerplate"),
    ("http://127.0.0.1/d.jpg", "IMG_2231.JPG", "junk_filename"),
    ("http://127.0.0.1/e.jpg", "a tall lighthouse at dusk", "mismatch_other_category"),
    ("http://127.0.0.1/e.jpg?utm_source=x", "a tall lighthouse at dusk", "url_variant"),
    ("http://127.0.0.1/f.jpg", "a bowl of ripe lemons", "clean"),
]


def _build(tmp):
    lines = ["url,caption"] + [f'{u},"{c}"' for u, c, _ in ROWS] + [f"{ROWS[0][0]},{ROWS[0][1]}"]
    (tmp / "m.csv").write_text("\n".join(lines) + "\n")
    (tmp / "b.yaml").write_text(
        f"name: t\nruns_dir: {tmp / 'runs'}\nsources:\n  - path: m.csv\n"
        "text_filter:\n  filters: [junk_caption]\nurl_dedup:\n  enabled: true\n")
    return load_build(tmp / "b.yaml")


def test_truth_report_counts_each_kind_where_the_ledger_dropped_it(tmp_path):
    cfg = _build(tmp_path)
    for stage in ("ingest", "text_filter", "url_dedup"):
        run_stage(cfg, stage, **QUIET)
    # the uids ingest gave each manifest row, joined to the kind we wrote it as
    ingest = cfg.run_dir / "01_ingest"
    got = pq.read_table(ingest / "kept.parquet").to_pylist() + pq.read_table(
        ingest / "dropped.parquet").to_pylist()
    assert len(got) == len(ROWS) + 1  # the repeated first row drops as an exact repeat
    kept_ingest = {r["uid"]: r for r in pq.read_table(ingest / "kept.parquet").to_pylist()}
    by_url = {r["url"]: r["uid"] for r in kept_ingest.values()}
    truth_rows = [{"source": "m", "url": u, "caption": c, "kind": k, "image_id": None,
                   "true_image_id": None, "true_caption": None, "source_image_id": None,
                   "transform": None, "aligned": k == "clean", "uid": by_url[u]}
                  for u, c, k in ROWS]
    # the exact repeat: its own manifest row, same uid, kind repeat_same_file
    truth_rows.append(dict(truth_rows[0], kind="repeat_same_file"))
    manifest_truth = tmp_path / "truth_manifest.parquet"
    pq.write_table(pa.Table.from_pylist(truth_rows), manifest_truth)
    assert write_truth(manifest_truth, cfg.run_dir / "truth.parquet")
    assert not write_truth(manifest_truth, cfg.run_dir / "truth.parquet")  # unchanged: kept
    per_uid = pq.read_table(cfg.run_dir / "truth.parquet").to_pylist()
    assert len(per_uid) == len(ROWS)
    assert {r["kind"] for r in per_uid if r["manifest_rows"] == 2} == {"clean"}

    report = curation_truth(cfg)
    assert report["stages"] == ["ingest", "text_filter", "url_dedup"]
    tf = report["by_stage"]["text_filter"]
    assert tf["junk_boilerplate"] == {"reached": 1, "dropped": 1}
    assert tf["junk_filename"] == {"reached": 1, "dropped": 1}
    assert "clean" not in tf  # no clean row was dropped
    assert report["clean_reached"]["text_filter"] == 3
    ud = report["by_stage"]["url_dedup"]
    assert sum(v["dropped"] for v in ud.values()) == 1  # one of the two lighthouse URLs
    assert report["kept_by_kind"]["clean"] == 3
    assert sum(report["kept_by_kind"].values()) == len(ROWS) - 3
    md = markdown(report)
    assert "| text_filter |" in md and "junk_filename 100 % (1)" in md
    assert "0 % (0 of 3)" in md  # the price: clean rows the text filter dropped
    table = arms_markdown({"curated": report, "raw": {"kept_by_kind": {"clean": 3, "junk": 2}}})
    assert "| clean | 75.0 % | 60.0 % |" in table


def test_no_truth_table_no_report(tmp_path):
    cfg = _build(tmp_path)
    run_stage(cfg, "ingest", **QUIET)
    assert curation_truth(cfg) is None
