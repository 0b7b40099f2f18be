"""The balance stage: counts, seeded draws, expected size, t from a target, partition invariance."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import balance, match
from pipeline.config import ConfigError, load_build
from pipeline.stage import get_spec, previous_stage, run_stage, stage_dir

WORDS = [f"w{i}" for i in range(30)]


def make_pool(n: int, seed: int = 1) -> pa.Table:
    """Captions with Zipf-skewed words w0..w29 (entries), filler, and some with no entry."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** 1.2 for i in range(len(WORDS))]
    caps = []
    for i in range(n):
        if i % 10 == 0:
            caps.append(f"nothing here {i}")
            continue
        k = rng.choice([1, 1, 2, 3])
        ws = rng.choices(WORDS, weights, k=k)
        caps.append(", ".join(ws) + f" photo {i % 7}.")
    return pa.table({"uid": [f"{i:08x}" for i in range(n)],
                     "url": [f"http://127.0.0.1/{i}.jpg" for i in range(n)],
                     "caption": caps, "source": ["test"] * n,
                     "width": list(range(n))})  # a column from an earlier stage, carried on


def write_metadata(path: Path) -> Path:
    path.write_text(json.dumps(WORDS + ["photo 3", "zzz"]))
    return path


def make_build(tmp_path: Path, stage: str, pool: pa.Table, **section) -> object:
    return make_build_multi(tmp_path, pool, {stage: section})


def make_build_multi(tmp_path: Path, pool: pa.Table, sections: dict[str, dict]) -> object:
    """A build with the given balance sections; each stage's upstream holds ``pool``."""
    meta = write_metadata(tmp_path / "metadata.json")
    yaml = f"name: t\nsources:\n  - path: none.csv\nruns_dir: {tmp_path / 'runs'}\n"
    for stage, section in sections.items():
        sec = {"enabled": True, "metadata": str(meta), "workers": 1, **section}
        yaml += f"{stage}:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in sec.items())
    (tmp_path / "build.yaml").write_text(yaml)
    cfg = load_build(tmp_path / "build.yaml")
    for stage in sections:
        up = stage_dir(cfg, previous_stage(cfg, get_spec(stage)))
        up.mkdir(parents=True, exist_ok=True)
        pq.write_table(pool, up / "kept.parquet", row_group_size=1500)
        (up / "report.json").write_text(json.dumps({"fingerprint": "up", "kept": len(pool)}))
        (up / "_SUCCESS").write_text("")
    return cfg


def ref_matches(pool: pa.Table, entries: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for u, c in zip(pool.column("uid").to_pylist(), pool.column("caption").to_pylist(),
                    strict=True):
        s = match.spacing(c)
        ids = [i for i, e in enumerate(entries) if f" {e} " in s]
        if ids:
            out[u] = ids
    return out


def ref_expected_and_keep(m: dict[str, list[int]], t: int, seed: int) -> tuple[float, set, dict]:
    counts: dict[int, int] = {}
    for ids in m.values():
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
    expected = 0.0
    keep = set()
    for u, ids in m.items():
        ps = [min(1.0, t / counts[i]) for i in ids]
        expected += 1 - math.prod(1 - p for p in ps)
        if any(balance.draw(u, i, seed) < p for i, p in zip(ids, ps, strict=True)):
            keep.add(u)
    return expected, keep, counts


def test_stage_accounts_every_row_and_matches_the_formula(tmp_path):
    pool = make_pool(6000)
    cfg = make_build(tmp_path, "balance", pool, t=150, seed=3)
    r = run_stage(cfg, "balance", log=lambda s: None)
    out = stage_dir(cfg, get_spec("balance"))
    kept = pq.read_table(out / "kept.parquet")
    dropped = pq.read_table(out / "dropped.parquet").to_pylist()
    assert r["rows_in"] == 6000 == kept.num_rows + len(dropped)
    assert kept.column_names == pool.column_names  # every input column carried forward
    entries = WORDS + ["photo 3", "zzz"]
    m = ref_matches(pool, entries)
    expected, keep, counts = ref_expected_and_keep(m, 150, 3)
    # The SQL draws are exactly the documented md5 draws.
    assert set(kept.column("uid").to_pylist()) == keep
    reasons = {d["uid"]: d["reason"] for d in dropped}
    assert {u for u, why in reasons.items() if why == "no_metadata_match"} == \
        set(pool.column("uid").to_pylist()) - set(m)
    assert {u for u, why in reasons.items() if why == "balanced_out"} == set(m) - keep
    for d in dropped:
        if d["reason"] == "balanced_out":
            n, i = min((counts[i], i) for i in m[d["uid"]])
            assert d["detail"].startswith(f"rarest entry {entries[i]} (count {n}, p=")
    # Entries with count <= t keep every pair.
    rare = {i for i, n in counts.items() if n <= 150}
    assert rare and all(u in keep for u, ids in m.items() if set(ids) & rare)
    # Expected kept: the report equals 1 - prod(1 - p) summed, actual is within 4 sigma.
    assert r["expected_kept"] == pytest.approx(expected, abs=0.1)
    var = sum((1 - math.prod(1 - min(1, 150 / counts[i]) for i in ids))
              * math.prod(1 - min(1, 150 / counts[i]) for i in ids) for ids in m.values())
    assert abs(r["actual_kept"] - expected) <= 4 * math.sqrt(var) + 1
    assert r["actual_kept"] == kept.num_rows and r["t"] == 150 and r["t_from"] == "config"
    # Report and data card material.
    assert r["head"][0]["entry"] == "w0" and r["head"][0]["before"] == counts[0]
    assert r["head"][0]["after"] < r["head"][0]["before"]
    assert len(r["tail"]) == 10 and r["tail"][-1]["before"] == min(counts.values())
    assert (out / "entry_counts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ec = pq.read_table(out / "entry_counts.parquet").to_pylist()
    assert {e["entry_id"]: e["count_before"] for e in ec} == counts
    report = json.loads((out / "report.json").read_text())
    assert report["expected_kept"] == r["expected_kept"] and report["method"] in (
        "duckdb", "ahocorasick")


def _decide(tmp_path: Path, pool: pa.Table, t: int, seed: int, method: str = "duckdb",
            parts: int = 1) -> set:
    """Match (optionally each part of the pool separately) and return the kept uids."""
    entries = pa.table({"entry_id": pa.array(range(len(WORDS)), pa.int64()),
                        "entry": WORDS})
    root = tmp_path / f"m-{method}-{parts}-{seed}-{t}"
    con = duckdb.connect()
    n = pool.num_rows
    for k in range(parts):
        src = root / f"pool{k}.parquet"
        src.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pool.slice(k * n // parts, (k + 1) * n // parts - k * n // parts), src)
        match.match_parquet(con, src, entries, root / f"part{k}", method, workers=1)
    balance.balance_matches(con, str(root / "part*" / "*.parquet"), t, 0, seed)
    return {u for (u,) in con.execute("SELECT uid FROM decided WHERE keep").fetchall()}


def test_same_seed_same_set_different_seed_different_set(tmp_path):
    pool = make_pool(3000)
    a = _decide(tmp_path, pool, 80, seed=0)
    assert a == _decide(tmp_path / "again", pool, 80, seed=0)
    b = _decide(tmp_path, pool, 80, seed=1)
    assert a != b and abs(len(a) - len(b)) < 0.2 * len(a)


def test_result_unchanged_when_input_is_split_or_shuffled(tmp_path):
    pool = make_pool(3000)
    whole = _decide(tmp_path, pool, 60, seed=5, method="duckdb")
    shuffled = pool.take(pa.array(random.Random(0).sample(range(3000), 3000)))
    assert _decide(tmp_path, shuffled, 60, seed=5, method="ahocorasick", parts=3) == whole
    assert _decide(tmp_path, pool, 60, seed=5, method="duckdb", parts=4) == whole


def test_t_from_target_size_is_closest(tmp_path):
    pool = make_pool(4000)
    cfg = make_build(tmp_path, "balance", pool, target_size=1500)
    r = run_stage(cfg, "balance", log=lambda s: None)
    t = r["t"]
    assert r["t_from"] == "target_size=1,500" and t > 1
    m = ref_matches(pool, WORDS + ["photo 3", "zzz"])
    exp = {k: ref_expected_and_keep(m, k, 0)[0] for k in (t - 1, t, t + 1)}
    assert r["expected_kept"] == pytest.approx(exp[t], abs=0.1)
    assert abs(exp[t] - 1500) <= abs(exp[t - 1] - 1500)
    assert abs(exp[t] - 1500) <= abs(exp[t + 1] - 1500)


def test_precrawl_and_final_balance_use_their_own_sections(tmp_path):
    pool = make_pool(3000)
    cfg = make_build_multi(tmp_path, pool, {"precrawl_balance": {"t": 400},
                                            "balance": {"t": 40}})
    r_pre = run_stage(cfg, "precrawl_balance", log=lambda s: None)
    r_fin = run_stage(cfg, "balance", log=lambda s: None)
    assert r_pre["t"] == 400 and r_fin["t"] == 40
    assert r_pre["kept"] > r_fin["kept"] > 0
    drops = pq.read_table(stage_dir(cfg, get_spec("precrawl_balance")) / "dropped.parquet")
    assert set(drops.column("stage").to_pylist()) == {"precrawl_balance"}


def test_new_metadata_reruns_the_stage_same_metadata_skips(tmp_path):
    pool = make_pool(500)
    cfg = make_build(tmp_path, "balance", pool, t=5)
    first = run_stage(cfg, "balance", log=lambda s: None)
    assert run_stage(cfg, "balance", log=lambda s: None).get("skipped")
    (tmp_path / "metadata.json").write_text(json.dumps(["w0"]))
    again = run_stage(cfg, "balance", log=lambda s: None)
    assert not again.get("skipped") and again["entries"] == 1 < first["entries"]


def test_pool_without_any_match_drops_everything(tmp_path):
    pool = make_pool(200).filter(pa.array([i % 10 == 0 for i in range(200)]))
    cfg = make_build(tmp_path, "balance", pool, t=5)
    r = run_stage(cfg, "balance", log=lambda s: None)
    assert r["kept"] == 0 and r["dropped_by_reason"] == {"no_metadata_match": 20}


@pytest.mark.parametrize("section,msg", [
    ({"metadata": ""}, "metadata: required"),
    ({"t": 0, "target_size": 0}, "set t"),
    ({"method": "regex"}, "not one of"),
    ({"t": -1}, "must be >= 0"),
])
def test_config_errors_name_the_key(tmp_path, section, msg):
    sec = {"enabled": True, "metadata": "m.json", "t": 5, **section}
    lines = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in sec.items())
    (tmp_path / "b.yaml").write_text(f"name: t\nsources:\n  - path: x.csv\nbalance:\n{lines}\n")
    with pytest.raises(ConfigError, match=msg) as e:
        load_build(tmp_path / "b.yaml")
    assert "balance." in str(e.value)
