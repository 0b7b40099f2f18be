"""What the card shows about the ledger: the snapshot, the funnel, samples of every drop reason,
duplicate clusters, decontamination hits and kept samples, as plain dicts for the template.

Every sample is a hash of (purpose, uid) — ``sample_key`` here and ``md5`` in the SQL agree —
so the card shows the same rows on every run and machine, whatever the order of the files.
A dropped row's columns come from its stage's input (the previous stage's kept.parquet, which
carries every column so far), so a tile knows the url, caption and crawl tar of any drop.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from pages.thumbs import Thumbs
from pipeline.config import BuildConfig
from pipeline.ledger import audit
from pipeline.stage import StageSpec, enabled_stages, read_report, stage_dir

SQL = Path(__file__).parent / "sql"
REPO = Path(__file__).resolve().parents[1]
UID_DETAIL = re.compile(r"^([0-9a-f]{32})\b")  # url/image/semantic dedup: detail = kept uid
EVAL_DETAIL = re.compile(r"^([^/]+)/(.+):([^:]+)$")  # decontaminate: <set>/<tar>:<key>
TILE_COLUMNS = ("uid", "url", "caption", "source", "tar", "key", "width", "height",
                "original_width", "original_height", "bytes", "clip_score")
VERSIONED = ("witforge", "duckdb", "pyarrow", "numpy", "pillow", "torch", "open-clip-torch",
             "img2dataset", "webdataset", "matplotlib")


def sample_key(uid: str, purpose: str) -> str:
    """The draw behind every sample of the card: md5('<purpose>:<uid>') (DuckDB's md5 too)."""
    return hashlib.md5(f"{purpose}:{uid}".encode()).hexdigest()


def sample_uids(uids: list[str], n: int, purpose: str) -> list[str]:
    """The n uids with the smallest keys: the same for any order of the input."""
    return sorted(set(uids), key=lambda u: (sample_key(u, purpose), u))[:n]


def _sql(name: str) -> str:
    return (SQL / name).read_text()


@dataclass
class StageView:
    spec: StageSpec
    folder: Path
    report: dict[str, Any]
    input: Path | None  # the previous finished stage's kept.parquet (None for ingest)

    @property
    def kept(self) -> Path:
        return self.folder / "kept.parquet"

    @property
    def dropped(self) -> Path:
        return self.folder / "dropped.parquet"


def finished_stages(cfg: BuildConfig) -> list[StageView]:
    """The build's finished stages in order, up to the first one not finished (as audit)."""
    out: list[StageView] = []
    for spec in enabled_stages(cfg):
        folder = stage_dir(cfg, spec)
        report = read_report(folder)
        if report is None:
            break
        out.append(StageView(spec, folder, report, out[-1].kept if out else None))
    return out


class LedgerView:
    """Queries over one build's stage folders, with one DuckDB connection."""

    def __init__(self, cfg: BuildConfig, con: duckdb.DuckDBPyConnection,
                 stages: list[StageView], thumbs: Thumbs) -> None:
        self.cfg, self.con, self.stages, self.thumbs = cfg, con, stages, thumbs
        self._columns: dict[Path, list[str]] = {}

    def columns(self, path: Path) -> list[str]:
        if path not in self._columns:
            self._columns[path] = [r[0] for r in self.con.execute(
                "DESCRIBE SELECT * FROM read_parquet($p)", {"p": str(path)}).fetchall()]
        return self._columns[path]

    def rows(self, path: Path | None, uids: list[str]) -> dict[str, dict[str, Any]]:
        """The tile columns of these uids in one parquet file, by uid."""
        if path is None or not uids:
            return {}
        cols = [c for c in TILE_COLUMNS if c in self.columns(path)]
        got = self.con.execute(
            f"SELECT {', '.join(cols)} FROM read_parquet($p) "
            "WHERE uid IN (SELECT unnest($u::VARCHAR[]))", {"p": str(path), "u": uids})
        names = [d[0] for d in got.description]
        found = {r[0]: dict(zip(names, r, strict=True)) for r in got.fetchall()}
        crawl = next((s for s in self.stages if s.spec.name == "crawl"), None)
        later = [u for u, r in found.items() if not r.get("tar")]
        if crawl is not None and later and "tar" not in cols:
            # a row of a stage before the crawl that went on to be crawled (a dedup keeper):
            # its picture is in the crawl's tars
            for u, r in self.rows(crawl.kept, later).items():
                found[u].update({k: v for k, v in r.items() if k not in found[u]})
        return found

    def tile(self, row: dict[str, Any] | None, uid: str, reason: str = "", detail: str = "",
             why_no_image: str = "") -> dict[str, Any]:
        row = row or {}
        thumb = self.thumbs.want_crawled(uid, row.get("tar"), row.get("key"))
        size = ""
        if row.get("original_width"):
            size = f"{row['original_width']}×{row['original_height']}"
        elif row.get("width"):
            size = f"{row['width']}×{row['height']}"
        score = row.get("clip_score")
        return {"uid": uid, "caption": row.get("caption"), "url": row.get("url"),
                "source": row.get("source"), "reason": reason, "detail": detail or "",
                "thumb": thumb, "size": size,
                "clip_score": None if score is None else f"{score:.4f}",
                "no_image": why_no_image or ("not downloaded" if not thumb else "")}

    # ---- sections 1 and 2 ----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        cfg, first, last = self.cfg, self.stages[0], self.stages[-1]
        yaml_bytes = cfg.path.read_bytes() if cfg.path.is_file() else b""
        finished = [(s.folder / "_SUCCESS").stat().st_mtime for s in self.stages]
        shards = None
        shard_dir = next((s for s in self.stages if s.spec.name == "shard"), None)
        if shard_dir is not None and (shard_dir.folder / "shards.parquet").is_file():
            n, b = self.con.execute("SELECT count(*), coalesce(sum(bytes), 0) FROM "
                                    "read_parquet($p)",
                                    {"p": str(shard_dir.folder / "shards.parquet")}).fetchall()[0]
            shards = {"count": n, "bytes": b, "folder": str(shard_dir.folder)}
        return {
            "name": cfg.name, "yaml_path": str(cfg.path),
            "yaml": yaml_bytes.decode("utf-8", "replace"),
            "yaml_sha256": hashlib.sha256(yaml_bytes).hexdigest()[:16],
            "run_dir": str(cfg.run_dir), "fingerprint": last.report.get("fingerprint", ""),
            "last_stage": last.spec.folder, "rows_in": first.report["rows_in"],
            "kept": last.report["kept"], "shards": shards,
            "stages": [{"folder": s.spec.folder, "fingerprint": s.report.get("fingerprint", ""),
                        "code": (s.report.get("inputs") or {}).get("code", ""),
                        "seconds": s.report.get("seconds"),
                        "finished": _date(t)} for s, t in zip(self.stages, finished, strict=True)],
            "first_finished": _date(min(finished)), "last_finished": _date(max(finished)),
            "written": _date(time.time()), "git": _git_commit(),
            "versions": {"python": platform.python_version(), **_versions()},
            "missing_stages": [s.folder for s in enabled_stages(cfg)
                               if s.folder not in {v.spec.folder for v in self.stages}],
            "reproduce": _reproduce(cfg),
        }

    def funnel(self) -> dict[str, Any]:
        """Counts from the ledger files themselves (``witforge audit``), not the reports."""
        results = audit(self.cfg)
        first = results[0].rows_in if results else 0
        rows = []
        for a in results:
            rows.append({"folder": a.folder, "rows_in": a.rows_in, "kept": a.kept,
                         "dropped": a.dropped,
                         "kept_of_input": a.kept / first if first else 0.0,
                         "dropped_of_stage": a.dropped / a.rows_in if a.rows_in else 0.0,
                         "top": list(a.by_reason.items())[:3], "problems": a.problems})
        return {"rows": rows, "ok": all(a.ok for a in results), "first": first,
                "last": results[-1].kept if results else 0}

    # ---- section 3 -----------------------------------------------------------------------

    def reasons(self, n: int, clusters: int) -> list[dict[str, Any]]:
        out = []
        for s in self.stages:
            if not s.report.get("dropped"):
                continue
            samples = self.con.execute(_sql("card_reason_samples.sql"), {
                "dropped": str(s.dropped), "stage": s.spec.name, "n": n}).fetchall()
            rows = self.rows(s.input, [u for _, u, _ in samples])
            by_reason: dict[str, list[dict[str, Any]]] = {}
            for reason, uid, detail in samples:
                by_reason.setdefault(reason, []).append(
                    self.tile(rows.get(uid), uid, reason, detail or "", _why(s, uid, rows)))
            entries = []
            for reason, count in s.report["dropped_by_reason"].items():
                tiles = by_reason.get(reason, [])
                entry = {"reason": reason, "count": count,
                         "of_dropped": count / s.report["dropped"],
                         "of_input": count / s.report["rows_in"] if s.report["rows_in"] else 0,
                         "tiles": tiles, "clusters": None, "eval_pairs": None}
                if tiles and all(UID_DETAIL.match(t["detail"]) for t in tiles):
                    entry["clusters"] = self._clusters(s, reason, clusters, n)
                elif (s.spec.module == "dedup.decontaminate" and reason == "eval_contamination"
                      and all(EVAL_DETAIL.match(t["detail"]) for t in tiles)):
                    entry["eval_pairs"] = self._eval_pairs(tiles)
                entries.append(entry)
            out.append({"folder": s.spec.folder, "stage": s.spec.name,
                        "rows_in": s.report["rows_in"], "dropped": s.report["dropped"],
                        "reasons": entries})
        return out

    def _clusters(self, s: StageView, reason: str, n: int, k: int) -> list[dict[str, Any]]:
        found = self.con.execute(_sql("card_clusters.sql"), {
            "dropped": str(s.dropped), "reason": reason, "n": n, "k": k}).fetchall()
        uids = [keeper for keeper, *_ in found] + [u for *_, us, _ in found for u in us]
        rows = self.rows(s.input, uids)
        return [{"kept": self.tile(rows.get(keeper), keeper, "kept", why_no_image=_why(
                     s, keeper, rows, kept=True)),
                 "dropped_count": count,
                 "dropped": [self.tile(rows.get(u), u, reason, d, _why(s, u, rows))
                             for u, d in zip(us, ds, strict=True)]}
                for keeper, count, us, ds in found]

    def _eval_pairs(self, tiles: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sets = {self.cfg.resolve(p).name: self.cfg.resolve(p)
                for p in self.cfg.decontaminate.eval_sets}
        pairs = []
        for t in tiles:
            m = EVAL_DETAIL.match(t["detail"])
            assert m is not None  # checked by the caller
            set_name, tar_rel, key = m.groups()
            folder = sets.get(set_name)
            thumb = self.thumbs.want_member(folder / tar_rel, key) if folder else None
            pairs.append({"train": t, "eval": {
                "thumb": thumb, "label": f"{set_name} {tar_rel} key {key}",
                "no_image": "" if thumb else f"eval set {set_name} is not in this build's "
                "decontaminate.eval_sets"}})
        return pairs

    # ---- section 4 -----------------------------------------------------------------------

    def kept_samples(self, n: int, atypical: int) -> dict[str, Any]:
        last = self.stages[-1]
        cols = self.columns(last.kept)
        picked = [r[0] for r in self.con.execute(
            f"SELECT uid FROM ({_sql('card_kept_samples.sql')})",
            {"kept": str(last.kept), "n": n}).fetchall()]
        groups: list[tuple[str, str, str]] = []  # (title, order by, note)
        if "caption" in cols:
            groups.append(("shortest captions", "length(caption), uid", ""))
        if "original_width" in cols:
            groups.append(("smallest images", "original_width * original_height, uid",
                           "by original (pre-resize) area"))
        if "clip_score" in cols:
            groups.append(("lowest CLIP scores", "clip_score NULLS FIRST, uid", ""))
        atyp = []
        for title, order, note in groups:
            uids = [r[0] for r in self.con.execute(
                f"SELECT uid FROM read_parquet($p) ORDER BY {order} LIMIT $n",
                {"p": str(last.kept), "n": atypical}).fetchall()]
            atyp.append({"title": title, "note": note, "uids": uids})
        rows = self.rows(last.kept, picked + [u for g in atyp for u in g["uids"]])
        why = "" if "tar" in cols else "not downloaded yet (the crawl has not run)"
        return {"folder": last.spec.folder, "count": last.report["kept"],
                "random": [self.tile(rows.get(u), u, why_no_image=why) for u in picked],
                "atypical": [{"title": g["title"], "note": g["note"],
                              "tiles": [self.tile(rows.get(u), u, why_no_image=why)
                                        for u in g["uids"]]} for g in atyp]}


def _why(s: StageView, uid: str, rows: dict[str, dict[str, Any]], kept: bool = False) -> str:
    """Why a tile has no picture, in words."""
    row = rows.get(uid)
    if row is not None and row.get("tar"):
        return ""
    if s.spec.name == "crawl":
        return "download failed"
    if row is None:
        return "row not found in the stage input" if s.input else "dropped at ingest"
    if kept:
        return "not downloaded (not crawled, or the crawl failed)"
    return "not downloaded (dropped before the crawl)"


def _date(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def _versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _git_commit() -> str:
    """The code's commit (with +dirty when the work tree differs), or '' outside a checkout."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True).stdout
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return head.strip() + ("+dirty" if dirty.strip() else "")


def _reproduce(cfg: BuildConfig) -> list[str]:
    y = str(cfg.path)
    if cfg.demo_web:
        # the demo build's web lives only inside `witforge demo` (make demo runs it)
        return [f"witforge demo --build {y}", f"witforge card --build {y}"]
    return [f"witforge run --build {y}", f"witforge train --build {y}",
            f"witforge evaluate --build {y}", f"witforge card --build {y}"]
