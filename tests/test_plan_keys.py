"""witforge plan's per-key parts on real runs: ftfy runs once per distinct caption, and web
captions repeat, so ingest's ftfy seconds follow the distinct captions, not the rows."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_build
from pipeline.plan import plan_build
from pipeline.plan_keep import caption_growth
from pipeline.plan_model import Cluster
from pipeline.stage import run_stage

ROWS = 20_000


def _pilot(tmp_path: Path, distinct_mojibake: int | None) -> Path:
    """ROWS pairs; every 10th caption is mojibake, one of ``distinct_mojibake`` strings (None:
    each its own)."""
    def caption(i: int) -> str:
        if i % 10:
            return f"a plain caption number {i}"
        k = i if distinct_mojibake is None else (i // 10) % distinct_mojibake
        return f"cafÃ© crÃ¨me number {k}"
    t = pa.table({"url": [f"http://h{i % 31}.org/{i}.jpg" for i in range(ROWS)],
                  "caption": [caption(i) for i in range(ROWS)]})
    pq.write_table(t, tmp_path / "m.parquet")
    y = tmp_path / "b.yaml"
    y.write_text(f"name: b\nruns_dir: {tmp_path / 'runs'}\nsources:\n  - path: m.parquet\n")
    return y


@pytest.mark.parametrize("distinct, exponent", [(5, 0.0), (None, 1.0)])
def test_distinct_captions_grow_as_measured_on_halves(tmp_path: Path, distinct, exponent):
    cfg = load_build(_pilot(tmp_path, distinct))
    report = run_stage(cfg, "ingest", log=lambda s: None)
    assert report["ftfy_captions"] == ROWS // 10
    assert report["ftfy_distinct_captions"] == (distinct or ROWS // 10)
    assert report["captions_repaired_by_ftfy"] == ROWS // 10
    g = caption_growth(cfg.run_dir / "01_ingest" / "kept.parquet")
    assert g["keys"] == (distinct or ROWS // 10) and g["exponent"] == pytest.approx(exponent,
                                                                                    abs=0.02)


def test_ingest_projection_scales_ftfy_by_distinct_captions(tmp_path: Path) -> None:
    cfg = load_build(_pilot(tmp_path, 5))
    report = run_stage(cfg, "ingest", log=lambda s: None)
    rows = 100 * ROWS
    row = next(r for r in plan_build(cfg, rows, calibrate=False)["stages"]
               if r["stage"] == "ingest")
    assert any("ftfy once per distinct caption: 5 in the pilot" in n for n in row["notes"])
    # the pilot's ftfy CPU counts once, not 100 times: the rest of the stage is per row
    ftfy_cpu = report["ftfy_cpu_seconds"]
    linear = row["cpu_fixed_seconds"] + row["cpu_seconds_per_row"] * rows
    assert row["cpu_seconds"] == pytest.approx(linear - ftfy_cpu * 99, rel=1e-3, abs=1e-3)


def test_a_one_row_group_pilot_is_one_thread_and_its_target_uses_every_core(
        tmp_path: Path) -> None:
    # 20k rows are one Parquet row group: DuckDB ran text_filter's rows on one thread
    cfg = load_build(_pilot(tmp_path, None))
    run_stage(cfg, "ingest", log=lambda s: None)
    run_stage(cfg, "text_filter", log=lambda s: None)
    rows = 100 * ROWS  # 17 row groups: in rounds of as many as the cores
    plan = plan_build(cfg, rows, calibrate=False)
    row = next(r for r in plan["stages"] if r["stage"] == "text_filter")
    cores = plan["pilot"]["cores"]
    parallel = 17 / math.ceil(17 / cores)  # the busiest thread's rounds of row groups
    expected = row["fixed_seconds"] + row["seconds_per_row"] * row["rows_in"] / parallel
    assert row["wall_seconds"] == pytest.approx(expected, rel=1e-3, abs=1e-3)
    # on another cluster, cores per node, not row groups, bound the threads
    wide = plan_build(cfg, rows, Cluster(1, 64, 0, None, None), calibrate=False)
    row64 = next(r for r in wide["stages"] if r["stage"] == "text_filter")
    assert row64["wall_seconds"] == pytest.approx(
        row["fixed_seconds"] + row["seconds_per_row"] * row["rows_in"] / 17, rel=1e-3, abs=1e-3)
