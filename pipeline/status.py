"""`witforge status`: which stages of a build are up to date, which would run next, and why.

Nothing runs and nothing is written. Each stage's fingerprint is computed as the runner would
compute it (its settings, its code, its input files, and the fingerprint its upstream stage
will have), and compared with the one in its report.json; where they differ, the inputs the
report recorded are compared with today's to name what changed.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import BuildConfig
from pipeline.stage import (
    StageSpec,
    enabled_stages,
    fingerprint_of,
    read_report,
    stage_dir,
    stage_inputs,
)

_SHOWN = 4  # changed keys listed per part before "+N more"


@dataclass
class StageStatus:
    folder: str
    up_to_date: bool
    kept: int | None
    why: list[str] = field(default_factory=list)


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flat(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _changed(a: dict[str, Any], b: dict[str, Any], both: bool = False) -> list[str]:
    """Keys of two flat dicts whose values differ (``both``: only keys on both sides)."""
    keys = a.keys() & b.keys() if both else a.keys() | b.keys()
    return [k for k in sorted(keys) if a.get(k, "<unset>") != b.get(k, "<unset>")]


def _listed(label: str, keys: list[str], describe: Any = None) -> list[str]:
    if not keys:
        return []
    shown = [describe(k) if describe else k for k in keys[:_SHOWN]]
    more = f", +{len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return [f"{label} {', '.join(shown)}{more}"]


def changes(report: dict[str, Any], inputs: dict[str, Any],
            upstream: StageSpec | None) -> list[str]:
    """What differs between the inputs a report recorded and today's, in words."""
    old = report.get("inputs")
    if old is None:
        return ["its report predates recorded inputs (written by an older witforge)"]
    why = []
    if old.get("upstream") != inputs["upstream"]:
        why.append(f"its input {upstream.folder if upstream else 'upstream'} changed")
    a, b = _flat(old.get("settings", {}), ""), _flat(inputs["settings"], "")
    why += _listed("setting", _changed(a, b),
                   lambda k: f"{k} {_short(a.get(k))} -> {_short(b.get(k))}")
    why += _listed("code", _changed(old.get("code_files", {}), inputs["code_files"]))
    # files that came or went with a setting (a filter added to the list) are said by it
    files = _changed(_flat(old.get("extra", {}), ""), _flat(inputs["extra"], ""),
                     both=bool(why))
    why += _listed("changed file", files)
    if not why:
        why.append("fingerprint differs (witforge's own fingerprint rules changed)")
    return why


def plan(cfg: BuildConfig) -> list[StageStatus]:
    """Every enabled stage in order, as `witforge run` would find it."""
    statuses = []
    upstream_fp, prev = "", None
    for spec in enabled_stages(cfg):
        inputs = stage_inputs(cfg, spec, upstream_fp)
        fp = fingerprint_of(inputs)
        folder = stage_dir(cfg, spec)
        report = read_report(folder)
        if report is None:
            if any(cfg.run_dir.glob(f".{spec.folder}.tmp-*")):
                why = ["an earlier run was interrupted; it starts again"]
            else:
                why = ["not run yet"]
            if (cfg.run_dir / f"{spec.folder}.work").is_dir():
                why.append(f"resumes from {spec.folder}.work/")
            statuses.append(StageStatus(spec.folder, False, None, why))
        elif report.get("fingerprint") == fp:
            statuses.append(StageStatus(spec.folder, True, report["kept"]))
        else:
            statuses.append(StageStatus(spec.folder, False, report["kept"],
                                        changes(report, inputs, prev)))
        upstream_fp, prev = fp, spec
    return statuses


def print_status(cfg: BuildConfig) -> bool:
    """Print the plan; True when every stage is up to date."""
    statuses = plan(cfg)
    width = max(len(s.folder) for s in statuses) + 2
    print(f"Status of build {cfg.name} ({cfg.run_dir})")
    print(f"{'stage':<{width}}{'state':<12}{'kept':>10}  why")
    for s in statuses:
        kept = f"{s.kept:,}" if s.kept is not None else "-"
        state = "up to date" if s.up_to_date else "will run"
        print(f"{s.folder:<{width}}{state:<12}{kept:>10}  {'; '.join(s.why)}".rstrip())
    pending = [s for s in statuses if not s.up_to_date]
    if pending:
        print(f"{len(pending)} of {len(statuses)} stages would run, from {pending[0].folder}: "
              f"witforge run --build {cfg.path}")
    else:
        print(f"all {len(statuses)} stages up to date")
    return not pending


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--build", required=True, help="the build YAML, e.g. manifests/demo.yaml")
    p.add_argument("--check", action="store_true",
                   help="exit with status 1 when any stage would run (for scripts and cron)")
