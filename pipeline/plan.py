"""`witforge plan`: what a build of N rows will cost, projected from a finished pilot build.

    witforge plan --build B --rows 400M [--nodes N --cores C --gpus G --nic-gbps X
                  --disk-mbps Y --prices FILE --epochs E --train-model M
                  --duplicates rate|sample] [--json OUT]

Per stage: rows in, keep ratio and rows out (pipeline/plan_keep.py), throughput, core-hours
(GPU-hours for embed and training), wall time on the given cluster, disk written, peak
temporary disk, network bytes, cost (only with --prices) and the bottleneck: CPU, NIC, disk,
or the politeness floor (a host's rows / its per-domain rate). Each stage's cost is split into
a fixed part and a per-row part: the pilot's own run and a calibration run on a tiny sample
of its input (pipeline/plan_measure.py). What the pilot did not measure comes from a published
figure, printed with its source under the table (pipeline/plan_defaults.py). Writes the
projection as JSON to runs/<build>/plan.json (the data card shows it).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import plan_defaults as D
from pipeline import plan_keep
from pipeline.config import BuildConfig, ConfigError, load_build, parse_size
from pipeline.plan_grow import fit_grown
from pipeline.plan_measure import (
    PER_KEY_SECONDS,
    Pilot,
    StageMeasure,
    calibrate,
    read_pilot,
)
from pipeline.plan_model import (
    Cluster,
    cost,
    crawl_floors,
    crawl_time,
    ftfy,
    phash_pool,
    robots,
    sig,
    speedup,
    timed_rows,
    train_row,
    url_split,
)
from pipeline.plan_report import format_table
from pipeline.stage import StageError

# Stages that spread over nodes: the crawl (img2dataset's pyspark distributor). The others
# run in one process on one node (DuckDB in-process, one pHash pool, one embed device).
NODE_STAGES = {"crawl"}
# Stages whose work is a DuckDB join, sort or aggregate over their whole input: past
# memory_limit, DuckDB spills to temp_directory.
DUCKDB_STAGES = {"ingest", "url_dedup", "precrawl_balance", "image_dedup", "balance"}
MOSTLY_FIXED = 0.25  # a pilot whose per-row part is below this share of its time
NOISE_S = 0.5  # ... and below this many seconds (a shared machine's timing noise)


def _fit(total: float, rows: int, cal: dict[str, Any] | None, key: str,
         per_key: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float]:
    """(fixed, per row) from the pilot's (rows, total) and the calibration: its run on the
    pilot's input repeated (a small pilot's per-row cost over a longer span), else its run
    on a tiny sample (the fixed cost). ``per_key``: the pilot's and the repeated run's
    seconds spent once per distinct key (``_per_key``)."""
    if not rows:
        return total, 0.0
    grown = (cal or {}).get("grown")
    if grown:
        got = fit_grown(rows, total, grown, key, *per_key)
        if got is not None:
            return got
    c = cal.get(key) if cal else None
    if c is None or "rows" not in cal:
        return 0.0, total / rows
    n = int(cal["rows"])
    if n >= rows:
        fixed = min(float(c), total)
        return fixed, (total - fixed) / rows
    per_row = max(0.0, (total - float(c)) / (rows - n))
    fixed = max(0.0, min(total, float(c) - per_row * n))
    return fixed, (total - fixed) / rows


def _per_key(m: StageMeasure, cpu_total: float) -> dict[str, tuple[float, float]]:
    """Per time key, the (pilot's, repeated calibration's) seconds that the stage spends
    once per distinct key (PER_KEY_SECONDS); a CPU share without its own key is the
    wall's share."""
    wall_k, cpu_k = PER_KEY_SECONDS.get(m.name, (None, None))
    grown = (m.calibration or {}).get("grown") or {}
    out = {}
    for key, k, total, g_total in (("seconds", wall_k, m.seconds, grown.get("seconds")),
                                   ("cpu_seconds", cpu_k, cpu_total, grown.get("cpu_seconds"))):
        if k:
            out[key] = (float(m.report.get(k) or 0.0), float(grown.get(k) or 0.0))
        elif wall_k and m.seconds and grown.get("seconds"):
            out[key] = (total * float(m.report.get(wall_k) or 0.0) / m.seconds,
                        float(g_total or 0.0) * float(grown.get(wall_k) or 0.0)
                        / float(grown["seconds"]))
        else:
            out[key] = (0.0, 0.0)
    return out


def _stage_row(m: StageMeasure, rows_in: float, pilot: Pilot, cl: Cluster,
               used: dict[str, D.Default], duplicates: str) -> dict[str, Any]:
    scale = rows_in / m.rows_in if m.rows_in else 0.0
    notes: list[str] = []
    out, keep_model, note = plan_keep.rows_out(pilot.cfg, m, _folder(pilot, m), rows_in,
                                               duplicates)
    keep = out / rows_in if rows_in else m.kept / max(m.rows_in, 1)
    if note:
        notes.append(note)
    cpu_total = m.cpu_seconds
    if cpu_total is None:
        cpu_total = m.seconds
        notes.append("no CPU time in report.json (written before witforge recorded it): "
                     "wall time x 1 core; rerun the stage for a measurement")
    cal = m.calibration
    timed = timed_rows(m, notes)  # rows the pilot's seconds were spent on
    keyed = _per_key(m, cpu_total)
    wf, wv = _fit(m.seconds, timed, cal, "seconds", keyed["seconds"])
    cf, cv = _fit(cpu_total, timed, cal, "cpu_seconds", keyed["cpu_seconds"])
    grown = (cal or {}).get("grown")
    if grown:
        own = wv - keyed["seconds"][0] / timed if timed else wv  # per-key seconds aside
        notes.append(f"per-row cost measured on the pilot's input repeated {grown['copies']} "
                     f"times ({grown['rows']:,} rows, each copy made distinct): "
                     f"{own * 1e6:,.2f} us/row, {wf:.2f} s fixed")
    fixed = 0.0
    if m.name == "embed" and not (cal and "rows" in cal):  # bootstrap: its folds' training
        folds = (m.report.get("bootstrap") or {}).get("folds") or []
        fixed = sum(float(f.get("train_seconds") or 0) for f in folds)
        if fixed:
            wf = min(fixed, m.seconds)
            wv = (m.seconds - wf) / timed if timed else 0.0
            cf = cpu_total * wf / m.seconds if m.seconds else 0.0
            cv = (cpu_total - cf) / timed if timed else 0.0
            notes.append(f"bootstrap: its {len(folds)} fold models' training ({fixed:,.0f} s) "
                         "counted as fixed (a set number of steps)")
    if cal and "skipped" in cal and not fixed:
        notes.append(f"fixed cost not calibrated ({cal['skipped']}): linear in rows, an "
                     "overstatement for a small pilot")
    elif (m.seconds and wv * timed < MOSTLY_FIXED * m.seconds and wv * timed < NOISE_S
          and not fixed and not grown):
        # Start-up is most of the pilot's time and the per-row part is a difference of noisy
        # times below the noise (a calibration run in a cold process can even exceed the
        # pilot). Use the upper bound, every second of the pilot per row, and say so.
        notes.append(f"the pilot's {m.seconds:.2f} s are mostly start-up (about {wf:.2f} s): "
                     "projected as if all of it were per row, an upper bound; a bigger pilot "
                     "measures the per-row cost")
        wf, wv = 0.0, m.seconds / timed
        cf, cv = 0.0, cpu_total / timed
    nodes = cl.nodes if m.name in NODE_STAGES else 1
    row: dict[str, Any] = {"stage": m.name, "rows_in": round(rows_in), "keep_ratio":
                           round(keep, 4), "rows_out": round(out),
                           "pilot_keep_ratio": round(m.kept / m.rows_in, 4) if m.rows_in
                           else None, "keep_model": keep_model}
    cpu_s = cf + cv * rows_in
    gpu_h = None
    basis = f"measured: {m.rows_in:,}-row pilot on {m.cores} cores"
    if m.name == "crawl" and pilot.crawl:
        cr = pilot.crawl
        per_node = max(1, round(cr.processes * cl.cores / m.cores))
        wall, cpu_s = crawl_time(m, cr, rows_in, timed, cl, per_node, (wf, wv, cf, cv),
                                 cpu_total, notes)
        basis += (f"; img2dataset {per_node} processes x {cr.threads} threads per node "
                  "(one per core, as its README advises)")
    elif m.name == "embed" and cl.gpus > 0 and pilot.embed_device != "cuda":
        used[D.EMBED_RATE.name] = D.EMBED_RATE
        gpu_h = rows_in / D.EMBED_RATE.value / 3600
        wall, cpu_s = gpu_h * 3600, 0.0
        basis = f"default: {D.EMBED_RATE.value:,.0f} samples/s per GPU (ViT-B/32)"
        notes.append("the embed stage runs on one device: its wall time is its GPU-hours")
    else:
        faster = speedup(m, rows_in, cl, timed)
        wall = wf + wv * rows_in / faster
        if m.name == "embed" and pilot.embed_device == "cuda":
            gpu_h = wall / 3600
        if m.name == "robots":
            wall, cpu_s = robots(m, pilot, rows_in, faster, (wf, wv, cf, cv), notes,
                                 (wall, cpu_s))
        if m.name == "ingest":
            wall, cpu_s = ftfy(m, pilot, rows_in, faster, (wf, wv, cf, cv), notes) or \
                (wall, cpu_s)
        if m.name == "url_dedup":
            extra = url_split(m, pilot, rows_in, faster, notes)
            wall, cpu_s = wall + extra[0], cpu_s + extra[1]
        if m.name == "image_dedup":
            wall, cpu_s = phash_pool(m, pilot, rows_in, cl, faster, (wf, wv, cf, cv), notes) or \
                (wall, cpu_s)
    floors = {"model": wall}
    disk = m.disk_bytes / m.rows_in * rows_in if m.rows_in else 0.0
    temp = m.work_bytes * scale if m.name == "crawl" else 0.0
    if m.name in DUCKDB_STAGES:
        limit = parse_size(pilot.cfg.duckdb.memory_limit)
        spill = m.input_bytes * scale
        if spill > limit:
            temp += spill
            notes.append("peak temp includes a DuckDB spill estimate (its input's Parquet "
                         f"bytes, over memory_limit {pilot.cfg.duckdb.memory_limit}): not "
                         "measured")
    net = 0.0
    if m.name == "crawl" and pilot.crawl:
        crawl_floors(m, pilot, cl, rows_in, keep, floors, notes, used)
        net = rows_in * keep * D.DOWNLOAD_BYTES.value
        used[D.DOWNLOAD_BYTES.name] = D.DOWNLOAD_BYTES
        if cl.nic_gbps:
            floors["NIC"] = net * 8 / (cl.nic_gbps * 1e9 * cl.nodes)
    if cl.disk_mbps:
        floors["disk"] = (disk + temp) / (cl.disk_mbps * 1e6 * nodes)
    name, wall = max(floors.items(), key=lambda kv: kv[1])
    if name == "model":
        name = _model_bottleneck(m, pilot, cpu_total, gpu_h)
    row.update({
        "rows_per_s": round(rows_in / wall, 1) if wall > 0 else None, "basis": basis,
        "core_hours": sig(cpu_s / 3600), "cpu_seconds": round(cpu_s, 3),
        "gpu_hours": sig(gpu_h) if gpu_h else None,
        "wall_hours": sig(wall / 3600), "wall_seconds": round(wall, 3), "nodes": nodes,
        "disk_written_bytes": round(disk), "peak_temp_bytes": round(temp),
        "network_bytes": round(net), "bottleneck": name,
        "floors_hours": {k if k != "model" else "measured rate": sig(v / 3600)
                         for k, v in floors.items()},
        "fixed_seconds": round(wf, 3), "seconds_per_row": round(wv, 9),
        "cpu_fixed_seconds": round(cf, 3), "cpu_seconds_per_row": round(cv, 9),
        "calibration": cal, "notes": notes})
    return row


def _folder(pilot: Pilot, m: StageMeasure) -> Path:
    return pilot.cfg.run_dir / m.folder


def _model_bottleneck(m: StageMeasure, pilot: Pilot, cpu: float, gpu_h: float | None) -> str:
    if gpu_h is not None:
        return "GPU"
    if m.name == "crawl":
        busy = cpu / (m.seconds * m.cores) if m.seconds else 0.0
        return "CPU" if busy >= 0.75 else "latency (threads wait on the servers)"
    return "CPU" if m.name in NODE_STAGES else "CPU (one node)"


def project(pilot: Pilot, rows: int, cl: Cluster, prices: D.Prices | None = None,
            epochs: float = D.EPOCHS.value, train_model: str = "ViT-B-32",
            duplicates: str = "rate") -> dict[str, Any]:
    """The projection of a ``rows``-row build from the pilot, as plan.json holds it."""
    used: dict[str, D.Default] = {}
    out: list[dict[str, Any]] = []
    n = float(rows)
    for m in pilot.stages:
        r = _stage_row(m, n, pilot, cl, used, duplicates)
        out.append(r)
        n = r["rows_out"]
    t = train_row(pilot, n, cl, epochs, train_model, used)
    if t is not None:
        out.append(t)
        if epochs == D.EPOCHS.value:
            used[D.EPOCHS.name] = D.EPOCHS
    if prices is not None:
        for r in out:
            r["cost"] = cost(r, cl, prices)
    totals = {k: sig(sum(r.get(k) or 0 for r in out)) for k in (
        "core_hours", "gpu_hours", "wall_hours", "disk_written_bytes", "network_bytes")}
    totals["peak_temp_bytes"] = max((r.get("peak_temp_bytes") or 0 for r in out), default=0)
    if prices is not None:
        totals["cost"] = sig(sum(r.get("cost") or 0 for r in out))
    first = pilot.stages[0]
    return {
        "build": pilot.cfg.name, "target_rows": rows,
        "pilot": {"run_dir": str(pilot.cfg.run_dir), "rows": first.rows_in,
                  "cores": pilot.cores, "stages_missing": pilot.missing,
                  "loopback_crawl": bool(pilot.crawl and pilot.crawl.loopback)},
        "cluster": asdict(cl), "duplicates": duplicates, "stages": out, "totals": totals,
        "defaults": [d.as_json() for d in used.values()],
        "prices": prices.as_json() if prices else None,
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def plan_build(cfg: BuildConfig, rows: int, cl: Cluster | None = None, **kw: Any) -> dict:
    """Read the pilot, calibrate (reusing the last plan.json's calibrations), project."""
    pilot = read_pilot(cfg)
    cache = {}
    last = cfg.run_dir / "plan.json"
    if last.is_file():
        try:
            cache = {r["stage"]: r["calibration"] for r in json.loads(last.read_text())["stages"]
                     if r.get("calibration")}
        except (ValueError, KeyError, TypeError):
            cache = {}
    skip = kw.pop("skip_calibration", None)
    if kw.pop("calibrate", True):
        calibrate(pilot, cache, skip)
    cl = cl or Cluster(1, pilot.cores, 0, None, None)
    return project(pilot, rows, cl, **kw)


def write_plan(plan: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(plan, indent=1, default=str))
    tmp.replace(path)
    return path


def demo_projection(cfg: BuildConfig) -> str:
    """What `make demo` prints at its end: the 400M projection of the demo build (written to
    runs/<build>/plan.json first, so the data card shows it), without the notes."""
    # the crawl's calibration (img2dataset's start-up, ~10 s) moves 400M rows little
    plan = plan_build(cfg, 400_000_000, skip_calibration={
        "crawl": "make demo skips it (~10 s of img2dataset start-up); witforge plan runs it"})
    out = write_plan(plan, cfg.run_dir / "plan.json")
    return (format_table(plan, notes=False) + f"\nper-stage notes: {out}; another cluster: "
            f"witforge plan --build {cfg.path} --nodes 16 --cores 16 --gpus 8 (docs/plan.md)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="witforge plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", required=True, help="the finished pilot build's YAML")
    p.add_argument("--rows", default="400M", help="rows entering ingest in the projected "
                   "build: 400M (default), 1.6B, 100k, 3000000")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--cores", type=int, help="cores per node (default: the pilot's)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per node (default 0: embed and "
                   "train on the CPU at the pilot's rate)")
    p.add_argument("--nic-gbps", type=float, help="network per node in Gbit/s (a NIC floor "
                   "for the crawl; none when not given)")
    p.add_argument("--disk-mbps", type=float, help="disk write MB/s per node (a disk floor "
                   "per stage; none when not given)")
    p.add_argument("--prices", help="a YAML/JSON file of per-hour prices with their date "
                   "(costs are shown only with it)")
    p.add_argument("--epochs", type=float, default=D.EPOCHS.value,
                   help="training epochs over the final rows (default 32, as open_clip's "
                   "LAION-400M runs)")
    p.add_argument("--train-model", default="ViT-B-32", choices=sorted(D.TRAIN_GPU_HOURS),
                   help="the model whose published GPU-hours scale training with --gpus")
    p.add_argument("--duplicates", choices=["rate", "sample"], default="rate",
                   help="rate (default): the target has the pilot's duplicate share; sample: "
                   "the pilot is a random sample of the target's rows, so more duplicates "
                   "meet at scale (dedup stages keep less)")
    p.add_argument("--no-calibrate", action="store_true", help="do not rerun stages on a tiny "
                   "sample (and a small pilot's on its input repeated to ~100k rows) to split "
                   "start-up from per-row cost (linear in rows)")
    p.add_argument("--json", help="write the projection here (default runs/<build>/plan.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        rows = D.parse_rows(args.rows)
        prices = D.load_prices(args.prices) if args.prices else None
        for flag in ("nodes", "cores", "gpus"):
            v = getattr(args, flag)
            if v is not None and v < (0 if flag == "gpus" else 1):
                raise ValueError(f"--{flag} {v}: must be at least {0 if flag == 'gpus' else 1}")
        cfg = load_build(args.build)
        if cfg.demo_web:
            from pipeline.demo import apply_demo_settings

            apply_demo_settings(cfg)
        pilot_cores = read_pilot(cfg).cores
        cl = Cluster(args.nodes, args.cores or pilot_cores, args.gpus, args.nic_gbps,
                     args.disk_mbps)
        plan = plan_build(cfg, rows, cl, prices=prices, epochs=args.epochs,
                          train_model=args.train_model, duplicates=args.duplicates,
                          calibrate=not args.no_calibrate)
    except (ValueError, ConfigError, StageError) as e:
        print(f"witforge plan: error: {e}", file=sys.stderr)
        return 2
    out = write_plan(plan, Path(args.json) if args.json else cfg.run_dir / "plan.json")
    print(format_table(plan))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
