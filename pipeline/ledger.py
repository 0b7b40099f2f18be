"""The ledger: every input row ends kept or dropped, with a stage and a reason.

``audit`` checks conservation for every finished stage (rows in = kept + dropped,
and after ingest every input uid appears exactly once in kept or dropped) and
prints the funnel; ``explain`` shows one pair's path through the build.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import BuildConfig
from pipeline.stage import connect, enabled_stages, read_report, stage_dir


@dataclass
class StageAudit:
    folder: str
    rows_in: int
    kept: int
    dropped: int
    by_reason: dict[str, int]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _q(path: Path) -> str:
    return "read_parquet('" + str(path).replace("'", "''") + "')"


def audit(cfg: BuildConfig) -> list[StageAudit]:
    """Check every finished stage of the build; unfinished stages are not listed."""
    con = connect(cfg)
    results: list[StageAudit] = []
    prev_kept: Path | None = None
    prev_count: int | None = None
    for spec in enabled_stages(cfg):
        folder = stage_dir(cfg, spec)
        report = read_report(folder)
        if report is None:
            break
        kept_p, dropped_p = folder / "kept.parquet", folder / "dropped.parquet"
        kept = con.execute(f"SELECT count(*) FROM {_q(kept_p)}").fetchall()[0][0]
        dropped = con.execute(f"SELECT count(*) FROM {_q(dropped_p)}").fetchall()[0][0]
        by_reason = dict(con.execute(
            f"SELECT reason, count(*) FROM {_q(dropped_p)} GROUP BY 1 ORDER BY 2 DESC"
        ).fetchall())
        a = StageAudit(spec.folder, report["rows_in"], kept, dropped, by_reason)
        if report["rows_in"] != kept + dropped:
            a.problems.append(f"rows in {report['rows_in']:,} != kept {kept:,} + dropped "
                              f"{dropped:,}")
        if prev_count is not None and report["rows_in"] != prev_count:
            a.problems.append(f"rows in {report['rows_in']:,} != previous stage's kept "
                              f"{prev_count:,} (stale stage: rerun it)")
        if prev_kept is not None:
            # Each input uid must come out exactly once, and nothing new may appear.
            bad = con.execute(f"""
                SELECT count(*) FROM (SELECT DISTINCT uid FROM {_q(prev_kept)}) i
                FULL OUTER JOIN (
                    SELECT uid, count(*) AS n FROM (
                        SELECT uid FROM {_q(kept_p)} UNION ALL SELECT uid FROM {_q(dropped_p)})
                    GROUP BY uid) o USING (uid)
                WHERE o.n IS DISTINCT FROM 1 OR i.uid IS NULL""").fetchall()[0][0]
            if bad:
                a.problems.append(f"{bad:,} uids are lost, duplicated or appeared from nowhere")
        results.append(a)
        prev_kept, prev_count = kept_p, kept
    return results


def format_funnel(results: list[StageAudit], top: int = 4) -> str:
    if not results:
        return "no finished stage yet"
    lines = [f"{'stage':<20} {'in':>10} {'kept':>10} {'dropped':>9}  top drop reasons",
             "-" * 92]
    for a in results:
        reasons = ", ".join(f"{k} {v:,}" for k, v in list(a.by_reason.items())[:top])
        more = len(a.by_reason) - top
        if more > 0:
            reasons += f", +{more} more"
        flag = "" if a.ok else "  <-- " + "; ".join(a.problems)
        lines.append(f"{a.folder:<20} {a.rows_in:>10,} {a.kept:>10,} {a.dropped:>9,}  "
                     f"{reasons}{flag}")
    first, last = results[0], results[-1]
    share = last.kept / first.rows_in if first.rows_in else 0.0
    lines.append("-" * 92)
    lines.append(f"{first.rows_in:,} rows ingested -> {last.kept:,} kept after {last.folder} "
                 f"({share:.1%})")
    return "\n".join(lines)


def print_audit(cfg: BuildConfig) -> bool:
    results = audit(cfg)
    print(f"\nFunnel of build {cfg.name} ({cfg.run_dir})")
    print(format_funnel(results))
    ok = all(a.ok for a in results)
    print("audit: every row accounted for" if ok else "audit: FAILED (see marks above)")
    return ok


def _normalize_url(url: str) -> str:
    m = re.match(r"^\s*([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*?)\s*$", url)
    if not m:
        return url.strip()
    return f"{m.group(1).lower()}://{m.group(2).lower()}{m.group(3)}"


def explain(cfg: BuildConfig, key: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """For each uid matching ``key`` (a uid or URL): [(stage, outcome, detail), ...]."""
    con = connect(cfg)
    stages = [(s, stage_dir(cfg, s)) for s in enabled_stages(cfg)]
    stages = [(s, d) for s, d in stages if read_report(d) is not None]
    if not stages:
        return []
    ingest_dir = stages[0][1]
    if re.fullmatch(r"[0-9a-f]{32}", key):
        uids = [key]
    else:
        url = _normalize_url(key)
        uids = [r[0] for r in con.execute(
            f"SELECT DISTINCT uid FROM {_q(ingest_dir / 'kept.parquet')} WHERE url IN (?, ?) "
            f"UNION SELECT DISTINCT uid FROM {_q(ingest_dir / 'dropped.parquet')} "
            f"WHERE detail LIKE ? OR detail LIKE ?",
            [key, url, key.strip() + " (%", url + " (%"]).fetchall()]
    out = []
    for uid in sorted(uids):
        path: list[tuple[str, str, str]] = []
        for spec, d in stages:
            drop = con.execute(f"SELECT reason, detail FROM {_q(d / 'dropped.parquet')} "
                               "WHERE uid = ?", [uid]).fetchall()
            kept = con.execute(f"SELECT * FROM {_q(d / 'kept.parquet')} WHERE uid = ? LIMIT 1",
                               [uid]).fetchall()
            for reason, detail in drop:
                path.append((spec.folder, f"dropped: {reason}", detail or ""))
            if kept:
                cols = [c[0] for c in con.execute(
                    f"DESCRIBE SELECT * FROM {_q(d / 'kept.parquet')}").fetchall()]
                row = dict(zip(cols, kept[0], strict=True))
                shown = {k: row[k] for k in ("url", "caption", "status", "width", "height",
                                             "sha256", "tar", "shard") if k in row}
                path.append((spec.folder, "kept", str(shown)[:160]))
            if not kept:
                break
        out.append((uid, path))
    return out


def print_explain(cfg: BuildConfig, key: str) -> bool:
    found = explain(cfg, key)
    if not found:
        print(f"{key}: not found in build {cfg.name} (looked for a uid or an ingested URL)")
        return False
    for uid, path in found:
        print(f"uid {uid}")
        for folder, outcome, detail in path:
            print(f"  {folder:<20} {outcome:<28} {detail}")
    return True
