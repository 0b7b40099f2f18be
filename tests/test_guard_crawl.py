"""End to end: the crawl stage runs img2dataset behind the guard against a hostile server.

Without the guard this manifest never finishes (a drip of 50 kB at 2 B/s) or eats the
machine's memory (an endless body); with it every row ends in the ledger with its reason,
within a bound set by the deadline, and no process of the crawl grows large."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import duckdb

from pipeline.config import load_build
from pipeline.guard.hostile import HostileServer
from pipeline.stage import kept_of, run_stage

DEADLINE = 2.0


def _descendants_rss_kb(root: int) -> dict[int, int]:
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                parents[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    mine, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - mine
        mine |= frontier
    out = {}
    for pid in mine:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[pid] = int(line.split()[1])
        except OSError:
            continue
    return out


class PeakRSS(threading.Thread):
    """Largest resident size of any process started by this test, sampled every 0.1 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kb = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            sizes = _descendants_rss_kb(os.getpid())
            self.peak_kb = max([self.peak_kb, *sizes.values()])


def hostile_cases(web: HostileServer, internal: HostileServer) -> dict[str, str]:
    """url -> the reason the crawl must give it (success: kept)."""
    b, port = web.base_url, web.port
    return {
        b + "/ok.png": "success", b + "/img/a.png": "success",
        b + "/drip": "deadline_exceeded", b + "/headers-drip": "deadline_exceeded",
        b + "/endless": "body_too_large", b + "/big": "body_too_large",
        f"{b}/redirect?to={internal.base_url}/secret.png": "blocked_address",
        f"{b}/redirect?to=ftp://127.0.0.1:{internal.port}/x": "blocked_scheme",
        f"{b}/redirect?to=file:///etc/passwd": "blocked_scheme",
        # another name for the server, so its Retry-After backoff (a per-domain matter)
        # does not turn the other cases into domain_busy
        f"http://localhost:{port}/ratelimited": "http_429",
        **{f"http://{h}:{port}/ok.png": "blocked_address"
           for h in ("2130706433", "0x7f000001", "0177.0.0.1", "[::ffff:127.0.0.1]",
                     "127.0.0.1.")},
    }


def test_hostile_manifest_crawls_to_the_right_reasons_in_bounded_time_and_memory(
        tmp_path: Path) -> None:
    with HostileServer(drip_interval=0.5) as web, HostileServer() as internal:
        port = web.port
        cases = hostile_cases(web, internal)
        (tmp_path / "m.jsonl").write_text("".join(
            json.dumps({"url": u, "caption": f"case {i}"}) + "\n" for i, u in enumerate(cases)))
        (tmp_path / "b.yaml").write_text(f"""name: g
runs_dir: {tmp_path / 'runs'}
sources: [{{path: m.jsonl}}]
url_dedup: {{enabled: false}}
crawl:
  guard: true
  robots: false
  request_deadline: {DEADLINE}
  max_body_bytes: 1000000
  processes_count: 1
  thread_count: 16
  timeout: 3
  allow_hosts: ["127.0.0.1:{port}", "localhost:{port}"]
""")
        cfg = load_build(tmp_path / "b.yaml")
        for stage in ("ingest", "text_filter"):
            run_stage(cfg, stage)
        sampler = PeakRSS()
        sampler.start()
        t = time.monotonic()
        report = run_stage(cfg, "crawl")
        secs = time.monotonic() - t
        sampler.stop.set()
        sampler.join()
        print(f"crawl {secs:.1f}s, peak RSS {sampler.peak_kb} kB")

        folder = kept_of(cfg, "crawl").parent
        got = dict(duckdb.sql(
            f"SELECT i.caption, coalesce(d.reason, 'success') FROM "
            f"'{kept_of(cfg, 'text_filter')}' i "
            f"LEFT JOIN '{folder / 'dropped.parquet'}' d USING (uid)").fetchall())
        want = {f"case {i}": reason for i, reason in enumerate(cases.values())}
        assert got == want
        details = [d for (d,) in duckdb.sql(
            f"SELECT detail FROM '{folder / 'dropped.parquet'}' "
            "WHERE reason = 'blocked_address'").fetchall()]
        assert all("witforge-guard blocked_address http" in d for d in details)
        assert any(f"{internal.base_url}/secret.png" in d for d in details)  # the hop refused
        assert report["rows_in"] == report["kept"] + report["dropped"] == len(cases)
        assert internal.hits == []  # the internal service was never reached
        # img2dataset alone takes ~10-25 s to start here; the drips alone would take hours.
        assert secs < 120, secs
        assert sampler.peak_kb < 1_500_000, f"peak RSS {sampler.peak_kb} kB"
        events = (folder.parent / "06_crawl.work").glob("attempt_*/guard.jsonl")
        summary = [json.loads(x) for p in events for x in p.read_text().splitlines()][-1]
        assert summary["summary"]["deadline_exceeded"] == 2
