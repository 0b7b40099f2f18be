"""How many rows a stage keeps at N rows in, when that is not the pilot's keep ratio.

Most stages judge each row on its own: their keep ratio holds at any size. Two kinds may not:

* dedup stages (ingest's exact repeats, url_dedup, image_dedup, semantic_dedup). Whether their
  share changes depends on how the pilot relates to the target (``--duplicates``):
  ``rate`` (the default): the target has the pilot's duplicate rate (the pilot is a part of
  manifests whose copies stay within parts, or the target is more of a web like the pilot's);
  ``sample``: the pilot is a random sample of the target's rows, so a duplicate's copies are
  thinned in it and more of them meet at scale. Drawn at rate q, a group of k copies gives
  E[duplicates] = kq - 1 + (1-q)^k: from r times the rows, between r and r^2 times the
  pilot's duplicates (r^2 for pairs). The exponent b (duplicates ~ rows^b, 1 <= b <= 2) is
  fit on random halves of the pilot's own rows;
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


def duplicate_growth(folder: Path, reasons: tuple[str, ...]) -> dict[str, Any] | None:
    """Rows, duplicate groups and duplicates of a dedup stage, and the exponent b of
    duplicates ~ rows^b: the mean over 8 random halves of log(dups / half's dups) /
    log(rows / half's rows), clamped to [1, 2] (the bounds of random sampling)."""
    quoted = ", ".join("'" + r + "'" for r in reasons)
    sql = (SQL / "plan_groups.sql").read_text().format(
        kept=folder / "kept.parquet", dropped=folder / "dropped.parquet", reasons=quoted)
    got = duckdb.connect().execute(sql).fetchall()
    n, g = next(((n, g) for s, n, g in got if s == -1), (0, 0))
    if n < 2:
        return None
    d = n - g
    halves = [(nh, nh - gh) for s, nh, gh in got if s >= 0 and 0 < nh < n]
    slopes = [math.log(d / dh) / math.log(n / nh) for nh, dh in halves if d > 0 and dh > 0]
    b = min(2.0, max(1.0, sum(slopes) / len(slopes))) if slopes else 2.0
    return {"rows": n, "groups": g, "duplicates": d, "exponent": round(b, 4),
            "halves_with_duplicates": len(slopes)}


def origin_growth(input_path: Path) -> dict[str, Any] | None:
    """Rows and distinct origins of the robots stage's input, and the exponent e of
    origins ~ rows^e (the mean over 8 random halves, clamped to [0, 1])."""
    return key_growth("plan_origins.sql", input_path)


def caption_growth(kept_path: Path) -> dict[str, Any] | None:
    """The same for the distinct captions ingest runs through ftfy, on its kept rows."""
    return key_growth("plan_captions.sql", kept_path)


def key_growth(sql_file: str, input_path: Path) -> dict[str, Any] | None:
    """{rows, keys, exponent}: distinct keys over every row of ``input_path`` (the keys query
    in ``sql_file``) and e of keys ~ rows^e, the mean over 8 random halves, clamped to [0, 1]."""
    keys = (SQL / sql_file).read_text().format(input=input_path)
    sql = (SQL / "plan_growth.sql").read_text().format(keys=keys)
    got = duckdb.connect().execute(sql).fetchall()
    n, k = next(((n, g) for s, n, g in got if s == -1), (0, 0))
    slopes = [math.log(k / kh) / math.log(n / nh) for s, nh, kh in got
              if s >= 0 and 0 < nh < n and kh > 0]
    if n < 2 or not k or not slopes:
        return None
    return {"rows": n, "keys": k,
            "exponent": round(min(1.0, max(0.0, sum(slopes) / len(slopes))), 4)}


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


def rows_out(cfg: BuildConfig, m: StageMeasure, folder: Path, rows_in: float,
             duplicates: str = "rate") -> tuple[float, dict[str, Any] | None, str | None]:
    """(rows kept at ``rows_in``, the model's figures or None, a note or None)."""
    linear = rows_in * m.kept / m.rows_in if m.rows_in else 0.0
    scale = rows_in / m.rows_in if m.rows_in else 0.0
    if m.name in DEDUP_REASONS and m.rows_in:
        h = duplicate_growth(folder, DEDUP_REASONS[m.name])
        if h is None:
            return linear, h, None
        # rows dropped for other reasons (unreadable...) keep their share; the rest dedups
        universe = rows_in * h["rows"] / m.rows_in
        r, found = universe / h["rows"], h["duplicates"]
        lo, hi = poisson_band(found)
        # the band: r to r^2 times the pilot's duplicates, at their Poisson bounds
        h["rows_out_low"] = round(max(0.0, universe - hi * r * max(r, 1.0)))
        h["rows_out_high"] = round(max(0.0, universe - lo * min(r, r * r)))
        h["mode"] = duplicates
        if duplicates == "rate":
            note = (f"--duplicates rate: the pilot's duplicate share ({found:,} of "
                    f"{h['rows']:,} rows) holds at scale; were the pilot a random sample of "
                    f"the target, up to r^2 = {r * r:,.3g}x its duplicates would meet "
                    "(--duplicates sample)" if found and r > 1 else None)
            return linear, h, note
        # more duplicates, never fewer groups than the pilot's, never more kept than linear
        kept = universe - found * r ** h["exponent"]
        kept = min(linear, max(kept, float(h["groups"]) if r >= 1 else 0.0))
        band = (f"95 % band {h['rows_out_low']:,}-{h['rows_out_high']:,} rows out"
                if r <= 10 else f"{r:,.3g}x the pilot: an assumption, not a measurement")
        note = (f"--duplicates sample: {found:,} duplicates in the pilot's {h['rows']:,} rows "
                f"grow as rows^{h['exponent']:.2f} (fit on random halves of them; between "
                f"r and r^2 = {r * r:,.3g} times); {band}")
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
