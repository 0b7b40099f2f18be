"""clip_filter's shipped filters on real DuckDB: LAION's minimum and DataComp's top fraction
(exact counts with ties), and the score that failed in each dropped row's detail."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from pipeline.filter import apply_filters, resolve_filter
from pipeline.sandbox import open_sandbox


def _drops(scores: list[float | None], name: str, **variables) -> dict[str, str]:
    rows = [{"uid": f"u{i}", "clip_score": s, "caption": "c"} for i, s in enumerate(scores)]
    con = open_sandbox(None, {"pairs": pa.Table.from_pylist(rows)}, variables)
    got = apply_filters(con, [resolve_filter(None, name)], "clip_filter").to_pylist()
    assert all(r["reason"] == name for r in got)
    return {r["uid"]: r["detail"] for r in got}


def test_min_keeps_scores_at_or_above_the_threshold_and_says_the_score():
    d = _drops([0.31, 0.28, 0.2799, None, -0.1], "clip_score_min", min_clip_score=0.28)
    assert set(d) == {"u2", "u3", "u4"}
    assert d["u2"] == "false; clip_score=0.2799"
    assert d["u3"] == "null; clip_score=NULL"  # no score: NULL drops


@pytest.mark.parametrize("n,fraction", [(10, 0.3), (7, 0.3), (100, 0.25), (3, 1.0), (9, 0.01)])
def test_top_keeps_exactly_ceil_fraction_n_without_ties(n, fraction):
    scores = [i / n for i in range(n)]  # all distinct
    kept = n - len(_drops(scores, "clip_score_top", fraction=fraction))
    assert kept == math.ceil(fraction * n)
    # the kept ones are the best ones
    dropped = _drops(scores, "clip_score_top", fraction=fraction)
    assert max(scores[int(u[1:])] for u in dropped) < min(
        s for i, s in enumerate(scores) if f"u{i}" not in dropped) if dropped else True


def test_top_keeps_every_row_tied_with_the_cut_and_drops_unscored():
    # 10 scored rows: ceil(0.3 * 10) = 3, the 3rd best is 0.8, tied four times -> 5 kept
    scores = [0.9, 0.8, 0.8, 0.8, 0.8, 0.5, 0.4, 0.3, 0.2, 0.1, None]
    d = _drops(scores, "clip_score_top", fraction=0.3)
    assert set(d) == {"u5", "u6", "u7", "u8", "u9", "u10"}
    assert d["u5"] == "false; clip_score=0.5000"
