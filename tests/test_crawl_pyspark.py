"""The crawl on img2dataset's pyspark distributor (``crawl.distributor: pyspark``), on a local
Spark: the same guard in front of it, the same ledger after it."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from pipeline.config import load_build
from pipeline.guard.hostile import HostileServer
from pipeline.stage import StageError, kept_of, run_stage


def _build(tmp: Path, urls: list[str], port: int) -> Path:
    (tmp / "m.jsonl").write_text("".join(
        json.dumps({"url": u, "caption": f"a picture {i}"}) + "\n" for i, u in enumerate(urls)))
    y = tmp / "b.yaml"
    y.write_text(f"""name: s
runs_dir: {tmp / 'runs'}
sources: [{{path: m.jsonl}}]
url_dedup: {{enabled: false}}
crawl:
  distributor: pyspark
  robots: false
  request_deadline: 5
  max_body_bytes: 1000000
  processes_count: 1
  thread_count: 4
  number_sample_per_shard: 4
  allow_hosts: ["127.0.0.1:{port}"]
""")
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
