"""How many rows a stage keeps at N rows in, when that is not the pilot's keep ratio.

Most stages judge each row on its own: their keep ratio holds at any size. Two kinds do not:

* dedup stages (ingest's exact repeats, url_dedup, image_dedup, semantic_dedup): a random
  pilot holds few of a duplicate's copies, a bigger run more, so the share dropped grows with
  the rows. The kept count is the number of distinct duplicate groups, which grows like
  rows^a (Heaps' law); ``a`` is fit on the pilot's own rows, from random halves of them;
* MetaCLIP balancing (balance, precrawl_balance) with a fixed t: an entry's count grows with
  the rows and its cap t does not, so the kept share falls. The expected kept count at scale
  is computed from the pilot's matches (each entry's count times the scale).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import duckdb

from pipeline.config import BuildConfig
from pipeline.plan_measure import StageMeasure

SQL = Path(__file__).parent / "sql"
DEDUP_REASONS = {
    "ingest": ("exact_repeat",),
    "url_dedup": ("duplicate_url_caption",),
    "image_dedup": ("duplicate_image_sha256", "near_duplicate_image"),
    "semantic_dedup": ("semantic_duplicate",),
}


def heaps(folder: Path, reasons: tuple[str, ...]) -> dict[str, Any] | None:
    """Rows and duplicate groups of a dedup stage, and the exponent a of groups ~ rows^a (the
    mean over 8 random halves of log(groups / half's groups) / log(rows / half's rows))."""
    quoted = ", ".join("'" + r + "'" for r in reasons)
    sql = (SQL / "plan_groups.sql").read_text().format(
        kept=folder / "kept.parquet", dropped=folder / "dropped.parquet", reasons=quoted)
    got = duckdb.connect().execute(sql).fetchall()
    whole = next(((n, g) for s, n, g in got if s == -1), (0, 0))
    n, g = whole
    if n < 2 or g < 1:
        return None
    slopes = [math.log(g / gh) / math.log(n / nh) for s, nh, gh in got
              if s >= 0 and 0 < nh < n and gh > 0]
    if not slopes:
        return None
    a = min(1.0, max(0.0, sum(slopes) / len(slopes)))
    return {"rows": n, "groups": g, "exponent": round(a, 4), "halves": len(slopes)}


def _poisson_cdf(k: int, lam: float) -> float:
    term = total = math.exp(-lam)
    for i in range(1, k + 1):
        term *= lam / i
        total += term
    return total


def poisson_band(d: int, level: float = 0.95) -> tuple[float, float]:
    """Garwood's exact interval for a Poisson count d: the duplicate count of a pilot is a
    draw, and a small pilot's few duplicates say little (3 found: 0.6 to 8.8)."""
    tail = (1 - level) / 2
    if d > 1000:  # the normal approximation is exact enough, and the sums would underflow
        return d - 1.96 * math.sqrt(d), d + 1.96 * math.sqrt(d)

    def solve(f: Any, lo: float, hi: float) -> float:
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) else (lo, mid)
        return (lo + hi) / 2

    upper = solve(lambda lam: _poisson_cdf(d, lam) > tail, 0.0, 10.0 * d + 10)
    lower = 0.0 if d == 0 else solve(lambda lam: 1 - _poisson_cdf(d - 1, lam) < tail, 0.0,
                                     float(d))
    return lower, upper


def balance_expected(folder: Path, scale: float, t: float) -> float:
    sql = (SQL / "plan_balance.sql").read_text().format(matches=folder / "matches" / "*.parquet")
    return float(duckdb.connect().execute(sql, {"r": float(scale), "t": float(t)})
                 .fetchall()[0][0])


def rows_out(cfg: BuildConfig, m: StageMeasure, folder: Path, rows_in: float) -> tuple[
        float, dict[str, Any] | None, str | None]:
    """(rows kept at ``rows_in``, the model's figures or None, a note or None)."""
    linear = rows_in * m.kept / m.rows_in if m.rows_in else 0.0
    scale = rows_in / m.rows_in if m.rows_in else 0.0
    if m.name in DEDUP_REASONS and m.rows_in:
        h = heaps(folder, DEDUP_REASONS[m.name])
        if h is None:
            return linear, h, None
        # rows dropped for other reasons (unreadable...) keep their share; the rest dedups
        universe = rows_in * h["rows"] / m.rows_in
        kept = min(h["groups"] * (universe / h["rows"]) ** h["exponent"], linear)
        # The band. Drawing rows at random from a fixed population, a group of k copies
        # gives E[dups] = kq - 1 + (1-q)^k at rate q: growing faster than q, slower than q^2
        # (exactly q^2 for pairs). So from r times the rows, r x to r^2 x the pilot's
        # duplicates, with the pilot's count at its Poisson bounds.
        r, found = universe / h["rows"], h["rows"] - h["groups"]
        lo, hi = poisson_band(found)
        h["rows_out_low"] = round(max(0.0, universe - hi * r * max(r, 1.0)))
        h["rows_out_high"] = round(max(0.0, universe - lo * min(r, r * r)))
        note = (f"duplicates grow with the rows: kept = distinct groups ~ rows^"
                f"{h['exponent']:.3f} (Heaps' law fit on random halves of the pilot's "
                f"{h['rows']:,} rows, {h['groups']:,} groups); far beyond the pilot an "
                f"assumption, not a measurement; {found:,} duplicates found, 95 % band "
                f"{h['rows_out_low']:,}-{h['rows_out_high']:,} rows out (between r and r^2 times "
                f"the duplicates, r = {r:,.3g})")
        return kept, h, note
    if m.name in ("balance", "precrawl_balance"):
        b = cfg.precrawl_balance if m.name == "precrawl_balance" else cfg.balance
        t = float(m.report.get("t") or 0)
        matches = folder / "matches"
        if not t or not matches.is_dir() or not any(matches.glob("*.parquet")):
            return linear, None, None
        if b.target_size:
            kept = min(float(b.target_size), linear)
            return kept, {"target_size": b.target_size}, (
                f"target_size {b.target_size:,}: t is chosen for it at any size")
        kept = balance_expected(folder, scale, t)
        pilot = balance_expected(folder, 1.0, t)
        # the pilot's draw against its expectation carries over (the seeded md5 draws)
        kept *= m.kept / pilot if pilot else 1.0
        return min(kept, linear), {"t": t, "expected_kept_pilot": round(pilot, 1)}, (
            f"MetaCLIP's cap t = {t:g} holds while every entry's count grows {scale:,.3g}x: "
            "expected kept from the pilot's matches at scale")
    return linear, None, None
