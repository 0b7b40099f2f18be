"""The crawl on img2dataset's pyspark distributor (``crawl.distributor: pyspark``), on a local
Spark and on a two-worker standalone cluster on loopback: the same guard in front of it (on a
cluster, one per executor), the same ledger after it."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from pipeline.config import load_build
from pipeline.guard.hostile import HostileServer
from pipeline.stage import StageError, kept_of, run_stage
from tests.spark_cluster import spark_cluster
from tests.test_guard_crawl import hostile_cases


def _build(tmp: Path, urls: list[str], port: int, **crawl: object) -> Path:
    """A build crawling ``urls`` (captions "case <i>") on pyspark unless ``crawl`` says
    otherwise."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "m.jsonl").write_text("".join(
        json.dumps({"url": u, "caption": f"case {i}"}) + "\n" for i, u in enumerate(urls)))
    settings = {"distributor": "pyspark", "robots": False, "request_deadline": 5,
                "max_body_bytes": 1000000, "processes_count": 1, "thread_count": 4,
                "number_sample_per_shard": 4, "allow_hosts": [f"127.0.0.1:{port}"], **crawl}
    y = tmp / "b.yaml"
    y.write_text(f"name: s\nruns_dir: {tmp / 'runs'}\nsources: [{{path: m.jsonl}}]\n"
                 f"url_dedup: {{enabled: false}}\ncrawl: {json.dumps(settings)}\n")
    return y


def test_pyspark_distributor_crawls_behind_the_guard(tmp_path: Path) -> None:
    with HostileServer() as web:
        images = [web.base_url + f"/img/{i}.png" for i in range(6)]
        cfg = load_build(_build(tmp_path, images + [web.base_url + "/big"], web.port))
        for stage in ("ingest", "text_filter"):
            run_stage(cfg, stage)
        report = run_stage(cfg, "crawl")
    assert report["kept"] == 6 and report["dropped_by_reason"] == {"body_too_large": 1}
    kept = {u for (u,) in duckdb.sql(f"SELECT url FROM '{kept_of(cfg, 'crawl')}'").fetchall()}
    assert kept == set(images)
    work = kept_of(cfg, "crawl").parent.parent / "06_crawl.work"
    log = "".join(p.read_text(errors="replace") for p in work.glob("attempt_*/crawl.log"))
    assert "Spark" in log  # Spark ran the download, not the multiprocessing distributor
    assert len(list(work.glob("attempt_*/images/*.tar"))) == 2  # 7 rows, 4 per shard


def test_pyspark_without_java_fails_before_downloading(tmp_path: Path, monkeypatch) -> None:
    cfg = load_build(_build(tmp_path, ["http://127.0.0.1:9/x.png"], 9))
    for stage in ("ingest", "text_filter"):
        run_stage(cfg, stage)
    monkeypatch.setenv("PATH", str(tmp_path))  # no java here
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(StageError, match="crawl.distributor: pyspark needs a Java runtime"):
        run_stage(cfg, "crawl")


def _hostile_build(tmp: Path, cases: dict[str, str], port: int, distributor: str) -> Path:
    return _build(tmp, list(cases), port, distributor=distributor, guard=True,
                  request_deadline=2, processes_count=2, number_sample_per_shard=2, timeout=3,
                  allow_hosts=[f"127.0.0.1:{port}", f"localhost:{port}"])


def _crawl(y: Path) -> tuple[dict[str, str], dict]:
    cfg = load_build(y)
    for stage in ("ingest", "text_filter"):
        run_stage(cfg, stage)
    report = run_stage(cfg, "crawl")
    got = dict(duckdb.sql(
        f"SELECT i.caption, coalesce(d.reason, 'success') FROM '{kept_of(cfg, 'text_filter')}' i "
        f"LEFT JOIN '{kept_of(cfg, 'crawl').parent / 'dropped.parquet'}' d USING (uid)"
    ).fetchall())
    return got, report


def test_hostile_crawl_on_a_two_worker_spark_cluster_is_guarded_on_every_executor(
        tmp_path: Path, monkeypatch) -> None:
    """A real Spark standalone cluster on loopback (a master, two workers, one executor each):
    each executor runs its own guard (pipeline/guard/spark_hook.py), every request of the
    crawl goes through one, the internal service is never reached, and every row ends with
    the same reason as on the multiprocessing distributor."""
    with HostileServer(drip_interval=0.5) as web, HostileServer() as internal:
        cases = hostile_cases(web, internal)
        want = {f"case {i}": reason for i, reason in enumerate(cases.values())}
        local, _ = _crawl(_hostile_build(tmp_path / "mp", cases, web.port, "multiprocessing"))
        assert local == want
        with spark_cluster(tmp_path / "spark", workers=2, memory="2g") as master:
            monkeypatch.setenv("PYSPARK_SUBMIT_ARGS", (
                f"--master {master} --conf spark.executor.memory=1g "
                "--conf spark.scheduler.minRegisteredResourcesRatio=1.0 pyspark-shell"))
            got, report = _crawl(_hostile_build(tmp_path / "spark", cases, web.port, "pyspark"))
        assert internal.hits == []
    assert got == local
    executors = [g for g in report["guards"] if g["log"].startswith("guard-")]
    stage_guard = [g for g in report["guards"] if g["log"] == "guard.jsonl"]
    assert len(executors) == 2, report["guards"]  # one guard per executor, both used
    assert all(not g.get("summary_missing") and g["requests"] > 0 for g in executors)
    assert stage_guard and stage_guard[0].get("requests", 0) == 0  # the driver fetched nothing
    # every row reached a guard (redirect hops are requests too; urllib refuses file:// itself)
    assert sum(g["requests"] for g in executors) >= len(cases) - 1
    assert sum(g.get("deadline_exceeded", 0) for g in executors) == 2
