"""`witforge plan`'s table: one line per stage, the totals, then every note and every default
the projection used, with its source."""

from __future__ import annotations

from typing import Any


def count(v: float | None) -> str:
    if v is None:
        return "-"
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            x = v / div
            return f"{x:.3g}{unit}" if x < 100 else f"{x:,.0f}{unit}"
    return f"{v:,.0f}" if v >= 10 or v == int(v) else f"{v:.2g}"


def nbytes(v: float | None) -> str:
    if not v:
        return "0" if v == 0 else "-"
    for div, unit in ((1e15, "PB"), (1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if v >= div:
            return f"{v / div:.3g} {unit}"
    return f"{v:.0f} B"


def duration(hours: float | None) -> str:
    if hours is None:
        return "-"
    s = hours * 3600
    if s < 60:
        return f"{s:.2g} s" if s < 10 else f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.3g} min"
    if hours < 48:
        return f"{hours:.3g} h"
    if hours < 24 * 365:
        return f"{hours / 24:.3g} d"
    return f"{hours / 24 / 365:.3g} y"


def hours(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


COLUMNS = [("stage", 16, "<"), ("rows in", 8, ">"), ("keep", 6, ">"), ("rows out", 8, ">"),
           ("rows/s", 7, ">"), ("core-h", 7, ">"), ("GPU-h", 7, ">"), ("wall", 9, ">"),
           ("disk", 9, ">"), ("tmp", 9, ">"), ("net", 9, ">"), ("cost", 9, ">"),
           ("bottleneck", 0, "<")]


def _cells(r: dict[str, Any], currency: str) -> list[str]:
    keep = r.get("keep_ratio")
    cost = r.get("cost")
    return [r["stage"], count(r.get("rows_in")),
            "-" if keep is None else f"{keep:.1%}" if keep < 0.9995 else "100%",
            count(r.get("rows_out")), count(r.get("rows_per_s")), hours(r.get("core_hours")),
            hours(r.get("gpu_hours")), duration(r.get("wall_hours")),
            nbytes(r.get("disk_written_bytes")), nbytes(r.get("peak_temp_bytes")),
            nbytes(r.get("network_bytes")),
            "-" if cost is None else f"{cost:,.0f} {currency}".strip(),
            r.get("bottleneck") or "-"]


def _line(cells: list[str]) -> str:
    return "  ".join(f"{c:{a}{w}}" if w else c for c, (_, w, a) in zip(cells, COLUMNS,
                                                                       strict=True)).rstrip()


def format_table(plan: dict[str, Any], notes: bool = True) -> str:
    p, cl = plan["pilot"], plan["cluster"]
    prices = plan.get("prices") or {}
    cur = prices.get("currency", "")
    nic = f", {cl['nic_gbps']:g} Gbps NIC" if cl.get("nic_gbps") else ""
    disk = f", disk {cl['disk_mbps']:g} MB/s" if cl.get("disk_mbps") else ""
    lines = [f"Plan for build {plan['build']}: {plan['target_rows']:,} rows, projected from "
             f"the {p['rows']:,}-row pilot in {p['run_dir']} ({p['cores']} cores)",
             f"cluster: {cl['nodes']} node(s) x {cl['cores']} cores, {cl['gpus']} GPU(s) "
             f"per node{nic}{disk}", "",
             _line([c for c, _, _ in COLUMNS])]
    lines += [_line(_cells(r, cur)) for r in plan["stages"]]
    t = plan["totals"]
    total = {"stage": "total", "core_hours": t["core_hours"], "gpu_hours": t["gpu_hours"] or
             None, "wall_hours": t["wall_hours"], "disk_written_bytes": t["disk_written_bytes"],
             "peak_temp_bytes": t["peak_temp_bytes"], "network_bytes": t["network_bytes"],
             "cost": t.get("cost"), "bottleneck": "stages one after another"}
    lines.append(_line(_cells(total, cur)))
    lines.append("")
    if notes:
        lines.append("basis per stage (measured = the pilot's own time, split into start-up "
                     "and per-row cost by a calibration run):")
        for r in plan["stages"]:
            lines.append(f"  {r['stage']}: {r.get('basis', '-')}")
            lines += [f"    - {n}" for n in r.get("notes", [])]
    if p.get("stages_missing"):
        lines.append("  not in the pilot (left out): " + ", ".join(p["stages_missing"]))
    if plan["defaults"]:
        lines.append("defaults (not measured by the pilot):")
        lines += [f"  {d['name']} = {d['value']:,g} {d['unit']}: {d['source']}"
                  for d in plan["defaults"]]
    if prices:
        lines.append(f"prices: {prices['path']}, read {prices['date']}"
                     + (f" ({prices['source']})" if prices.get("source") else ""))
    else:
        lines.append("cost: no --prices file given")
    return "\n".join(lines)
