"""How each curation step did against ground truth, per kind of row.

A build with a truth table (``runs/<build>/truth.parquet``: uid, kind, one row per uid; the demo
writes it from its manifests' truth) gets ``curation_truth.json`` and ``curation_truth.md``: for
every stage and every kind (``clean``, each download fault, junk caption, mismatch, template,
placeholder, near-duplicate...), how many rows of the kind reached the stage and what share it
dropped. So "the CLIP-score filter dropped 71 % of mismatched captions and 9 % of clean pairs"
is a line of the table, not a guess.

The share is of the rows that *reached* the stage: a text filter that dropped a junk caption
leaves none of it for the crawl to drop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import BuildConfig
from pipeline.stage import StageSpec, connect, enabled_stages, stage_dir

SQL = Path(__file__).parent / "sql"
CLEAN = "clean"


def truth_path(cfg: BuildConfig) -> Path:
    return cfg.run_dir / "truth.parquet"


def write_truth(manifest_truth: Path, out: Path) -> bool:
    """One truth row per uid from the demo manifests' truth (truth_per_uid.sql), written only
    when its rows change (the embed stage fingerprints the file). True if written."""
    con = duckdb.connect()
    table = con.sql((SQL / "truth_per_uid.sql").read_text(),
                    params={"truth": str(manifest_truth)}).to_arrow_table()
    con.close()
    if out.is_file() and pq.read_table(out).equals(table):
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)
    return True


def curation_truth(cfg: BuildConfig, truth: Path | None = None) -> dict[str, Any] | None:
    """Per stage and kind: rows reached and dropped, or None without a truth table. ``truth``
    defaults to the build's own (an arm of `witforge compare` reads the build's)."""
    truth = truth or truth_path(cfg)
    if not truth.is_file():
        return None
    finished = [(i, s) for i, s in enumerate(enabled_stages(cfg))
                if (stage_dir(cfg, s) / "report.json").is_file()]
    stages = [(s.name, i) for i, s in finished]
    con = connect(cfg)

    def _q(spec: StageSpec, what: str) -> str:
        return "read_parquet('" + str(stage_dir(cfg, spec) / f"{what}.parquet").replace(
            "'", "''") + "')"

    # ingest's exact repeats drop under the uid of the row it keeps: that uid goes on
    parts = [f"SELECT uid, '{s.name}' AS stage, {i} AS position FROM {_q(s, 'dropped')}"
             + (f" WHERE uid NOT IN (SELECT uid FROM {_q(s, 'kept')})"
                if s.name == "ingest" else "")
             for i, s in finished]
    con.execute("CREATE TEMP TABLE dropped AS " + (" UNION ALL ".join(parts) if parts else
                "SELECT NULL::VARCHAR AS uid, NULL::VARCHAR AS stage, NULL::INT AS position "
                "LIMIT 0"))
    con.register("stages", pa.table({"stage": [n for n, _ in stages],
                                     "position": pa.array([i for _, i in stages], pa.int32())}))
    rows = con.execute((SQL / "curation_truth.sql").read_text(),
                       {"truth": str(truth)}).fetchall()
    totals = dict(con.execute("SELECT coalesce(kind, 'clean'), count(*) FROM read_parquet($t) "
                              "GROUP BY ALL", {"t": str(truth)}).fetchall())
    kept_by_kind: dict[str, int] = {}
    if finished:
        kept = stage_dir(cfg, finished[-1][1]) / "kept.parquet"
        kept_by_kind = dict(con.execute(
            "SELECT coalesce(t.kind, 'clean'), count(*) FROM read_parquet($k) k "
            "JOIN read_parquet($t) t USING (uid) GROUP BY ALL",
            {"k": str(kept), "t": str(truth)}).fetchall())
    con.close()
    by_stage: dict[str, dict[str, dict[str, int]]] = {}
    for stage, _, kind, reached, dropped in rows:
        if dropped:
            by_stage.setdefault(stage, {})[kind] = {"reached": reached, "dropped": dropped}
    return {"truth": str(truth), "stages": [n for n, _ in stages], "rows_by_kind": totals,
            "kept_by_kind": kept_by_kind, "by_stage": by_stage,
            "clean_reached": {s: _reached(rows, s, CLEAN) for s, _ in stages}}


def _reached(rows: list[tuple], stage: str, kind: str) -> int:
    return next((r[3] for r in rows if r[0] == stage and r[2] == kind), 0)


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.0f} %" if b else "–"


def markdown(report: dict[str, Any]) -> str:
    """Per stage: the kinds it dropped, each as the share of that kind's rows that reached it,
    with the share of clean rows it dropped beside them (the price); then the kept share per
    kind of the whole build."""
    lines = ["| stage | dropped (share of the kind's rows that reached the stage) | "
             "clean rows dropped |", "|---|---|---|"]
    for stage in report["stages"]:
        kinds = report["by_stage"].get(stage, {})
        if not kinds:
            continue
        clean = kinds.get(CLEAN, {"dropped": 0, "reached": report["clean_reached"][stage]})
        noisy = sorted(((k, v) for k, v in kinds.items() if k != CLEAN),
                       key=lambda kv: -kv[1]["dropped"])
        cells = ", ".join(f"{k} {_pct(v['dropped'], v['reached'])} ({v['dropped']})"
                          for k, v in noisy) or "–"
        lines.append(f"| {stage} | {cells} | {_pct(clean['dropped'], clean['reached'])} "
                     f"({clean['dropped']} of {clean['reached']}) |")
    lines += ["", "| kind | manifest rows (one per uid) | in the final shards | kept |",
              "|---|---:|---:|---:|"]
    for kind, n in sorted(report["rows_by_kind"].items(), key=lambda kv: (kv[0] != CLEAN,
                                                                           -kv[1])):
        k = report["kept_by_kind"].get(kind, 0)
        lines.append(f"| {kind} | {n} | {k} | {_pct(k, n)} |")
    return "\n".join(lines) + "\n"


def write_report(cfg: BuildConfig) -> Path | None:
    """curation_truth.json and .md in the build folder; None when the build has no truth."""
    report = curation_truth(cfg)
    if report is None:
        return None
    (cfg.run_dir / "curation_truth.json").write_text(json.dumps(report, indent=1))
    md = cfg.run_dir / "curation_truth.md"
    md.write_text("# Curation against the truth table\n\n" + markdown(report))
    return md


def arms_markdown(reports: dict[str, dict[str, Any]]) -> str:
    """What each arm's shards are made of: every kind's share of the arm's final rows."""
    arms = list(reports)
    kinds = sorted({k for r in reports.values() for k in r["kept_by_kind"]},
                   key=lambda k: (k != CLEAN, -max(r["kept_by_kind"].get(k, 0)
                                                   for r in reports.values())))
    totals = {a: sum(r["kept_by_kind"].values()) for a, r in reports.items()}
    lines = ["| kind (share of the arm's rows) | " + " | ".join(arms) + " |",
             "|---|" + "---:|" * len(arms)]
    for k in kinds:
        lines.append(f"| {k} | " + " | ".join(
            _pct1(reports[a]["kept_by_kind"].get(k, 0), totals[a]) for a in arms) + " |")
    lines.append("| rows | " + " | ".join(f"{totals[a]:,}" for a in arms) + " |")
    return "\n".join(lines) + "\n"


def _pct1(a: int, b: int) -> str:
    return f"{100 * a / b:.1f} %" if b else "–"
