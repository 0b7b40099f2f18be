"""Crawl stage: real img2dataset against real HTTP servers on 127.0.0.1.

The demo web serves the committed fixture pool with its injected faults; a second small
server here has /flaky/ paths that fail once and then work, and counts every request, to
prove that --retry-failed asks again only for what failed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_build
from pipeline.crawl import ERROR_REASONS, _prepare_work, classify_error, image_tar
from pipeline.crawl_attempt import Attempt
from pipeline.crawl_resume import confirmed_shards, shard_name
from pipeline.demoweb.pool import FIXTURE_DIR
from pipeline.demoweb.server import DemoWeb
from pipeline.stage import get_spec, kept_of, run_stage, stage_dir

REPO = Path(__file__).resolve().parents[1]
# timeout 2 s: a SYN dropped by a busy server's backlog is retransmitted after 1 s.
CRAWL = ("crawl: {timeout: 2, processes_count: 1, thread_count: 4, number_sample_per_shard: 10,"
         " image_size: 48, robots: false, guard: false}")
EXPECTED = {  # fault path -> (reason, how many of them in the manifest)
    "f/404": ("http_404", 2), "f/500": ("http_5xx", 2), "f/slow": ("timeout", 6),
    "f/reset": ("connection_error", 2), "f/truncated": ("decode_error", 2),
    "f/html": ("decode_error", 2), "f/noai": ("disallowed_header", 2),
    "loop/a": ("redirect_loop", 2),
}
GOOD = {"img": 14, "r": 3, "alias/2": 3, "private": 2}  # robots are off: /private/ downloads


def _pool_ids() -> list[str]:
    t = pq.read_table(FIXTURE_DIR / "pool.parquet", columns=["image_id", "split"]).to_pydict()
    return [i for i, s in zip(t["image_id"], t["split"], strict=True) if s == "web"]


def _fault_urls(base: str) -> list[tuple[str, str]]:
    """(caption, url) covering every fault class and every kind of success."""
    ids = iter(_pool_ids())
    rows = []
    for path, n in [*((p, n) for p, (_, n) in EXPECTED.items()), *GOOD.items()]:
        for _ in range(n):
            ref = next(ids) + (".jpg" if path == "f/truncated" else "")
            rows.append((f"{path} picture {ref}", f"{base}/{path}/{ref}"))
    return rows


def _make_build(root: Path, rows: list[tuple[str, str]], name: str = "t") -> Path:
    """A build whose crawl input comes from the real ingest and (filterless) text_filter."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pairs.tsv").write_text("".join(f"{c}\t{u}\n" for c, u in rows))
    y = root / "build.yaml"
    y.write_text(f"name: {name}\nruns_dir: {root / 'runs'}\nsources:\n"
                 "  - {path: pairs.tsv, format: tsv, header: false, caption_col: column0, "
                 "url_col: column1, tag: demo}\n"
                 f"url_dedup: {{enabled: false}}\n{CRAWL}\n")
    cfg = load_build(y)
    for stage in ("ingest", "text_filter"):
        run_stage(cfg, stage, log=lambda s: None)
    return y


def _table(cfg) -> tuple[list[tuple], list[tuple]]:
    d = stage_dir(cfg, get_spec("crawl"))
    kept = duckdb.sql(f"SELECT * FROM '{d}/kept.parquet' ORDER BY uid").fetchall()
    dropped = duckdb.sql(f"SELECT uid, stage, reason, CASE WHEN reason = 'timeout' THEN '' "
                         f"ELSE detail END FROM '{d}/dropped.parquet' ORDER BY uid").fetchall()
    return kept, dropped


@pytest.fixture(scope="module")
def web():
    with DemoWeb(FIXTURE_DIR, slow_seconds=4) as w:
        yield w


@pytest.fixture(scope="module")
def crawled(web, tmp_path_factory):
    """One uninterrupted crawl of the fault manifest."""
    y = _make_build(tmp_path_factory.mktemp("whole"), _fault_urls(web.base_url))
    cfg = load_build(y)
    report = run_stage(cfg, "crawl", log=lambda s: None)
    return cfg, report


def test_classify_error_on_real_messages():
    assert classify_error("HTTP Error 404: Not Found") == "http_404"
    assert classify_error("HTTP Error 503: Service Unavailable") == "http_5xx"
    assert classify_error("HTTP Error 403: Forbidden") == "http_403"
    assert classify_error("HTTP Error 418: I'm a teapot") == "http_4xx"
    assert classify_error("HTTP Error 302: The HTTP server returned a redirect error that "
                          "would lead to an infinite loop.\nThe last 30x error message was:\n"
                          "Found") == "redirect_loop"
    assert classify_error("timed out") == "timeout"
    assert classify_error("<urlopen error timed out>") == "timeout"
    assert classify_error("The read operation timed out") == "timeout"
    assert classify_error("[Errno 104] Connection reset by peer") == "connection_error"
    assert classify_error("<urlopen error [Errno 111] Connection refused>") == "connection_error"
    assert classify_error("Remote end closed connection without response") == "connection_error"
    assert classify_error("<urlopen error [Errno -2] Name or service not known>") == "dns_error"
    assert classify_error("IncompleteRead(344 bytes read, 344 more expected)") == "truncated"
    assert classify_error("Image decoding error") == "decode_error"
    assert classify_error("Use of image disallowed by X-Robots-Tag directive") == \
        "disallowed_header"
    assert classify_error("image too small") == "too_small"
    assert classify_error("image area too large") == "too_large"
    assert classify_error("aspect ratio too large") == "bad_aspect_ratio"
    assert classify_error("unknown url type: 'ftp'") == "bad_url"
    assert classify_error("something nobody has seen") == "other"
    assert classify_error(None) == "other"
    # The table is ordered and open: a reason added in front wins (the guard's proxy reasons).
    ERROR_REASONS.insert(0, (r"witforge-guard: blocked", "blocked_address"))
    try:
        assert classify_error("HTTP Error 403: witforge-guard: blocked 10.0.0.1") == \
            "blocked_address"
    finally:
        ERROR_REASONS.pop(0)
    assert classify_error("HTTP Error 403: witforge-guard: blocked 10.0.0.1") == "http_403"


def test_every_fault_class_lands_with_its_reason(crawled):
    cfg, report = crawled
    d = stage_dir(cfg, get_spec("crawl"))
    rows_in = sum(n for _, n in EXPECTED.values()) + sum(GOOD.values())
    assert report["rows_in"] == rows_in and report["kept"] + report["dropped"] == rows_in
    dropped = duckdb.sql(f"SELECT d.reason, d.detail, i.url FROM '{d}/dropped.parquet' d "
                         f"JOIN '{kept_of(cfg, 'ingest')}' i USING (uid)").fetchall()
    by_path = Counter()
    for reason, detail, url in dropped:
        path = next(p for p in EXPECTED if f"/{p}/" in url)
        assert reason == EXPECTED[path][0], (url, reason, detail)
        assert detail, url  # img2dataset's own message is kept
        by_path[path] += 1
    assert by_path == {p: n for p, (_, n) in EXPECTED.items()}
    kept = duckdb.sql(f"SELECT url, source, caption, status FROM '{d}/kept.parquet'").fetchall()
    kinds = Counter(next(k for k in GOOD if f"/{k}/" in url) for url, *_ in kept)
    assert kinds == GOOD
    assert {(s, st) for _, s, _, st in kept} == {("demo", "success")}
    assert report["success_rate"] == round(len(kept) / rows_in, 4)
    assert report["images_per_s"] > 0 and report["downloaded_samples"] == rows_in


def test_sizes_and_sha256_match_the_tar(crawled):
    cfg, _ = crawled
    d = stage_dir(cfg, get_spec("crawl"))
    pool = pq.read_table(FIXTURE_DIR / "pool.parquet").to_pandas().set_index("image_id")
    rows = duckdb.sql(f"SELECT url, width, height, original_width, original_height, sha256, "
                      f"source_sha256, bytes, tar, key FROM '{d}/kept.parquet'").fetchall()
    assert rows
    for url, w, h, ow, oh, sha, src_sha, size, tar, key in rows:
        assert not Path(tar).is_absolute()
        with tarfile.open(image_tar(cfg, tar)) as t:
            data = t.extractfile(f"{key}.jpg").read()
            meta = json.loads(t.extractfile(f"{key}.json").read())
        assert hashlib.sha256(data).hexdigest() == sha and len(data) == size
        assert meta["url"] == url
        image_id = url.rsplit("/", 1)[1]
        src = pool.loc[image_id]
        assert (ow, oh) == (src.width, src.height)
        assert min(w, h) == min(48, ow, oh)  # keep_ratio: the short side becomes image_size
        original = (FIXTURE_DIR / src.file).read_bytes()
        assert src_sha == hashlib.sha256(original).hexdigest()  # bytes as downloaded


def _alive(pid: int) -> bool:
    try:
        return b"pipeline.crawl_worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_killed_crawl_resumes_to_the_same_table(crawled, web, tmp_path):
    cfg_whole, _ = crawled
    y = _make_build(tmp_path, _fault_urls(web.base_url))
    cfg = load_build(y)
    images = cfg.run_dir / "06_crawl.work" / "attempt_000" / "images"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "crawl", "--build", str(y)],
                            cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while len(list(images.glob("*_stats.json"))) < 2:
            assert proc.poll() is None, "the crawl ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # the stage process; its worker must follow
        proc.wait()
        worker = int((images.parent / "worker.pid").read_text())
        deadline = time.time() + 10
        while _alive(worker):
            assert time.time() < deadline, "the img2dataset worker outlived the killed stage"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done = sorted(images.glob("*_stats.json"))
    shards = math.ceil((sum(GOOD.values()) + sum(n for _, n in EXPECTED.values())) / 10)
    assert 2 <= len(done)
    assert not stage_dir(cfg, get_spec("crawl")).exists()
    # Only shards the stage saw finished while it was alive are resumed (crawl_resume.py);
    # one finished between its last look and the kill is downloaded again.
    confirmed = confirmed_shards(Attempt(0, images.parent))
    intact = [p for p in done[1:-1] if shard_name(p) in confirmed]
    intact_rows = sum(json.loads(p.read_text())["count"] for p in intact)
    # A kill while img2dataset writes a stats file leaves it half-written, and a tar cut short
    # (a crash of the machine) is possible too: both shards must be downloaded again.
    done[-1].write_text('{"count": ')
    tar = done[0].with_name(done[0].name.replace("_stats.json", ".tar"))
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    report = run_stage(cfg, "crawl", log=lambda s: None)
    assert report["resumed_shards"] == len(intact)
    assert report["downloaded_samples"] == report["rows_in"] - intact_rows
    assert len(list(images.glob("*_stats.json"))) == shards
    assert _table(cfg) == _table(cfg_whole)


class _Flaky(BaseHTTPRequestHandler):
    """/ok/<id> always serves the image; /flaky/<id> answers 503 the first time only."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            srv.hits[self.path] += 1
            first = srv.hits[self.path] == 1
        kind, image_id = self.path.strip("/").split("/")
        if kind == "flaky" and first:
            self.send_error(503)
            return
        body = (FIXTURE_DIR / srv.files[image_id]).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/png" if srv.files[image_id].endswith("png")
                         else "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def flaky():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    srv.daemon_threads = True
    srv.hits, srv.lock = Counter(), threading.Lock()
    t = pq.read_table(FIXTURE_DIR / "pool.parquet", columns=["image_id", "file"]).to_pydict()
    srv.files = dict(zip(t["image_id"], t["file"], strict=True))
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_retry_failed_downloads_only_the_failed_and_the_new(flaky, tmp_path):
    base = f"http://127.0.0.1:{flaky.server_address[1]}"
    ids = _pool_ids()[:12]
    rows = [(f"ok {i}", f"{base}/ok/{i}") for i in ids[:5]] + \
           [(f"flaky {i}", f"{base}/flaky/{i}") for i in ids[5:10]]
    cfg = load_build(_make_build(tmp_path, rows))
    first = run_stage(cfg, "crawl", log=lambda s: None)
    assert (first["kept"], first["dropped"]) == (5, 5)
    assert first["dropped_by_reason"] == {"http_5xx": 5}
    assert set(flaky.hits.values()) == {1}
    again = run_stage(cfg, "crawl", log=lambda s: None)  # unchanged: skipped, nothing fetched
    assert again.get("skipped") and sum(flaky.hits.values()) == 10
    # Two rows appear upstream (a changed filter) and the failures are retried: one new
    # attempt holds exactly the 5 failed and the 2 new rows.
    extra = [(f"new {i}", f"{base}/ok/{i}") for i in ids[10:]]
    cfg = load_build(_make_build(tmp_path, rows + extra))
    retried = run_stage(cfg, "crawl", options={"retry_failed": True}, log=lambda s: None)
    assert (retried["kept"], retried["dropped"]) == (12, 0)
    assert retried["downloaded_samples"] == 7 and retried["attempts"] == 2
    assert flaky.hits == Counter({f"/ok/{i}": 1 for i in ids[:5] + ids[10:]} |
                                 {f"/flaky/{i}": 2 for i in ids[5:10]})
    kept = duckdb.sql(f"SELECT caption, attempt, tar FROM "
                      f"'{stage_dir(cfg, get_spec('crawl'))}/kept.parquet'").fetchall()
    assert {(c.split()[0], a) for c, a, _ in kept} == {("ok", 0), ("flaky", 1), ("new", 1)}
    assert all(image_tar(cfg, t).is_file() for *_, t in kept)


def test_changed_image_settings_start_from_scratch(tmp_path):
    y = tmp_path / "b.yaml"
    y.write_text(f"name: t\nruns_dir: {tmp_path}\nsources: [{{path: x.tsv}}]\n{CRAWL}\n")
    cfg = load_build(y)
    work = tmp_path / "work"
    assert not _prepare_work(cfg, work)
    (work / "attempt_000").mkdir()
    cfg.crawl.timeout = 9  # not an image setting: downloads stay
    assert not _prepare_work(cfg, work)
    assert (work / "attempt_000").exists()
    cfg.crawl.image_size = 96
    assert _prepare_work(cfg, work)
    assert not (work / "attempt_000").exists()
