"""Sections 5-8 of the card: captions, images, crawl errors, sources and domains; balance;
training and evaluation; the scale projection. Each returns None when its inputs do not exist
(a stage not run, no training yet), and the page says so.

"Before" is what ingest kept (every pair read), "after" the last finished stage's kept rows.
Image figures use the crawl's original (pre-resize) sizes: what the web served.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pages import card_plots
from pages.card_data import LedgerView, StageView

URL_EXT = r"\.([A-Za-z0-9]{2,5})(?:[?#].*)?$"
URL_HOST = r"^[A-Za-z][A-Za-z0-9+.\-]*://(?:[^/?#@]*@)?(\[[^\]]*\]|[^/?#:]+)"
LANG_COLUMNS = ("language", "lang", "LANGUAGE", "lang_id")


def _stage(lv: LedgerView, name: str) -> StageView | None:
    return next((s for s in lv.stages if s.spec.name == name), None)


def _q(lv: LedgerView, sql: str, **params: Any) -> list[tuple]:
    return lv.con.execute(sql, {k: str(v) if isinstance(v, Path) else v
                                for k, v in params.items()}).fetchall()


def _column(lv: LedgerView, sql: str, path: Path) -> np.ndarray:
    """One numeric column as a numpy array (a list of Python ints would take ~30x the
    memory on a 10M-row build)."""
    return lv.con.execute(sql, {"p": str(path)}).fetchnumpy()["v"]


def captions(lv: LedgerView, out: Path) -> dict[str, Any] | None:
    before, after = lv.stages[0].kept, lv.stages[-1].kept
    if "caption" not in lv.columns(before):
        return None
    lengths = {}
    for label, p in (("ingested", before), ("kept", after)):
        lengths[label] = _column(lv, "SELECT length(coalesce(caption, ''))::DOUBLE AS v "
                                 "FROM read_parquet($p)", p)
    plot = card_plots.hist_pair(lengths, "caption length (characters)", out / "captions.png",
                                clip=300)
    stats = []
    for label, p in (("ingested", before), ("kept", after)):
        n, chars, words = _q(lv, """SELECT count(*), median(length(caption)),
            median(len(string_split(trim(caption), ' '))) FROM read_parquet($p)""", p=p)[0]
        stats.append((label, n, chars, words))
    repeated = _q(lv, """
        SELECT b.caption, count(*) AS n, count(DISTINCT b.url) AS urls,
               coalesce(any_value(k.n), 0) AS kept
        FROM read_parquet($b) b
        LEFT JOIN (SELECT caption, count(*) AS n FROM read_parquet($a) GROUP BY 1) k USING (caption)
        GROUP BY b.caption HAVING count(*) > 1 ORDER BY n DESC, b.caption LIMIT 12""",
                  b=before, a=after)
    lang = next((c for c in LANG_COLUMNS if c in lv.columns(after)), None)
    languages = None
    if lang is not None:
        languages = _q(lv, f'SELECT "{lang}", count(*) FROM read_parquet($p) GROUP BY 1 '
                       "ORDER BY 2 DESC, 1 LIMIT 12", p=after)
    return {"plot": plot, "stats": stats, "repeated": repeated, "languages": languages,
            "language_column": lang}


def images(lv: LedgerView, out: Path) -> dict[str, Any] | None:
    crawl = _stage(lv, "crawl")
    if crawl is None:
        return None
    after = lv.stages[-1].kept
    exprs = {"side": "least(original_width, original_height)",
             "aspect": "greatest(original_width, original_height) / "
                       "nullif(least(original_width, original_height), 0)",
             "bytes": "bytes"}
    data = {}
    for label, p in (("crawled", crawl.kept), ("kept", after)):
        data[label] = {k: _column(lv, f"SELECT ({e})::DOUBLE AS v FROM read_parquet($p) "
                                  f"WHERE ({e}) IS NOT NULL", p) for k, e in exprs.items()}
    plot = card_plots.image_hists(data, out / "images.png")
    formats = _q(lv, f"""
        SELECT coalesce(nullif(lower(regexp_extract(c.url, '{URL_EXT}', 1)), ''), '(none)') AS f,
               count(*) AS crawled, count(k.uid) AS kept
        FROM read_parquet($c) c LEFT JOIN (SELECT uid FROM read_parquet($a)) k USING (uid)
        GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 12""", c=crawl.kept, a=after)
    summary = _q(lv, """SELECT count(*), median(original_width), median(original_height),
        min(least(original_width, original_height)), max(greatest(original_width,
        original_height)), sum(bytes) FROM read_parquet($p)""", p=crawl.kept)[0]
    return {"plot": plot, "formats": formats, "stored_as": lv.cfg.crawl.encode_format,
            "image_size": lv.cfg.crawl.image_size,
            "summary": dict(zip(("images", "median_width", "median_height", "min_side",
                                 "max_side", "bytes"), summary, strict=True))}


def crawl_errors(lv: LedgerView) -> list[dict[str, Any]] | None:
    """Top messages per crawl drop reason, URLs replaced by <url> so messages group."""
    crawl = _stage(lv, "crawl")
    if crawl is None:
        return None
    rows = _q(lv, r"""
        SELECT reason, count(*) OVER (PARTITION BY reason) AS total, msg, n FROM (
            SELECT reason, regexp_replace(coalesce(detail, ''), 'https?://\S+', '<url>', 'g')
                   AS msg, count(*) AS n
            FROM read_parquet($d) GROUP BY 1, 2)
        QUALIFY row_number() OVER (PARTITION BY reason ORDER BY n DESC, msg) <= 3
        ORDER BY sum(n) OVER (PARTITION BY reason) DESC, reason, n DESC, msg""", d=crawl.dropped)
    by: dict[str, dict[str, Any]] = {}
    for reason, _, msg, n in rows:
        entry = by.setdefault(reason, {"reason": reason, "count": 0, "messages": []})
        entry["messages"].append((msg, n))
    for reason, n in crawl.report["dropped_by_reason"].items():
        if reason in by:
            by[reason]["count"] = n
    return sorted(by.values(), key=lambda e: (-e["count"], e["reason"]))


def sources(lv: LedgerView) -> dict[str, Any]:
    before, after = lv.stages[0].kept, lv.stages[-1].kept
    out: dict[str, Any] = {"sources": None, "domains": None}
    if "source" in lv.columns(before):
        out["sources"] = _q(lv, """
            SELECT b.source, count(*) AS n, count(k.uid) AS kept
            FROM read_parquet($b) b LEFT JOIN (SELECT uid FROM read_parquet($a)) k USING (uid)
            GROUP BY 1 ORDER BY 2 DESC, 1""", b=before, a=after)
    if "url" in lv.columns(before):
        out["domains"] = _q(lv, f"""
            SELECT lower(regexp_extract(b.url, '{URL_HOST}', 1)) AS host, count(*) AS n,
                   count(k.uid) AS kept
            FROM read_parquet($b) b LEFT JOIN (SELECT uid FROM read_parquet($a)) k USING (uid)
            GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 15""", b=before, a=after)
        out["domain_count"] = _q(lv, f"""SELECT count(DISTINCT lower(regexp_extract(url,
            '{URL_HOST}', 1))) FROM read_parquet($b)""", b=before)[0][0]
    return out


def balance(lv: LedgerView, out: Path) -> list[dict[str, Any]]:
    from pipeline.balance import plot_counts

    found = []
    for s in lv.stages:
        if s.spec.module != "pipeline.balance":
            continue
        counts = s.folder / "entry_counts.parquet"
        plot = None
        if counts.is_file():
            table = pq.read_table(counts).sort_by([("count_before", "descending"),
                                                   ("entry_id", "ascending")])
            plot = f"entry_counts_{s.spec.name}.png"
            plot_counts(table, s.report["t"], out / plot, s.spec.name)
        r = s.report
        found.append({"folder": s.spec.folder, "plot": plot, "head": r.get("head", []),
                      "tail": r.get("tail", []),
                      "figures": [(k, r.get(k)) for k in (
                          "t", "t_from", "entries", "matched_entries", "entries_over_t",
                          "matches", "expected_kept", "actual_kept", "method") if k in r]})
    return found


def markdown_table(text: str) -> dict[str, Any]:
    """A pipe table and the lines around it, as cells (escaped later like every text)."""
    header: list[str] = []
    rows: list[list[str]] = []
    notes: list[str] = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("|") and s.endswith("|"):
            cells = [c.strip() for c in s[1:-1].split("|")]
            if all(set(c) <= set("-: ") and c for c in cells):
                continue  # the |---| separator
            if header:
                rows.append(cells)
            else:
                header = cells
        elif s:
            notes.append(s)
    return {"header": header, "rows": rows, "notes": notes}


def _copy(src: Path, out: Path, name: str) -> str | None:
    if not src.is_file():
        return None
    shutil.copyfile(src, out / name)
    return name


def training(lv: LedgerView, out: Path) -> dict[str, Any] | None:
    run = lv.cfg.run_dir
    found: dict[str, Any] = {"tables": [], "plots": [], "train": None, "evals": []}
    summary = run / "eval" / "summary.md"
    if summary.is_file():
        found["tables"].append(("raw vs curated (make demo, one seed)", "eval/summary.md",
                                markdown_table(summary.read_text(encoding="utf-8"))))
    compare = run / "compare" / "compare.md"
    if compare.is_file():
        found["tables"].append(("witforge compare (arms x seeds)", "compare/compare.md",
                                markdown_table(compare.read_text(encoding="utf-8"))))
    elif (run / "compare" / "compare.json").is_file():
        from training.compare import markdown

        payload = json.loads((run / "compare" / "compare.json").read_text())
        found["tables"].append(("witforge compare (arms x seeds)", "compare/compare.json",
                                markdown_table(markdown(payload["summary"], payload["chance"]))))
    for src, name, title in ((run / "train" / "curves.png", "curves.png", "training curves"),
                             (run / "eval" / "compare.png", "eval_compare.png", "raw vs curated"),
                             (run / "compare" / "compare.png", "compare.png", "compare")):
        if (copied := _copy(src, out, name)) is not None:
            found["plots"].append((title, copied))
    if (run / "train" / "summary.json").is_file():
        t = json.loads((run / "train" / "summary.json").read_text())
        found["train"] = [(k, t[k]) for k in ("steps", "target_steps", "global_batch",
                                              "world_size", "final_loss", "samples_per_s")
                          if k in t]
    for p in sorted((run / "eval").glob("*_*.json")) if (run / "eval").is_dir() else []:
        r = json.loads(p.read_text())
        if isinstance(r, dict) and "dataset" in r and "task" in r:
            metrics = [(k, v) for k, v in r.items() if isinstance(v, float)]
            found["evals"].append({"dataset": r["dataset"], "task": r["task"],
                                   "metrics": metrics})
    if not (found["tables"] or found["plots"] or found["train"] or found["evals"]):
        return None
    return found


def plan(lv: LedgerView) -> Any:
    """runs/<b>/plan.json (``witforge plan``) as it is, or None."""
    p = lv.cfg.run_dir / "plan.json"
    return json.loads(p.read_text()) if p.is_file() else None
