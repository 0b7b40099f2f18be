"""The guarding proxy, driven directly with urllib (what img2dataset uses) against a hostile
server on loopback. A second loopback server stands in for the internal service."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.guard.hostile import HostileServer
from pipeline.guard.proxy import GuardProxy, classify_guard_error, settings_from_crawl
from pipeline.guard.server import GuardSettings

DEADLINE = 1.0


@pytest.fixture(scope="module")
def servers():
    with HostileServer(drip_interval=0.2) as web, HostileServer() as internal:
        yield web, internal


@pytest.fixture(scope="module")
def proxy(servers, tmp_path_factory):
    web, _ = servers
    s = GuardSettings(deadline=DEADLINE, max_body_bytes=256 * 1024,
                      allow_hosts=[f"127.0.0.1:{web.port}"], per_domain_concurrency=16)
    events = tmp_path_factory.mktemp("guard") / "events.jsonl"
    with GuardProxy(s, events_path=events) as p:
        yield p


def fetch(proxy: GuardProxy, url: str, timeout: float = 10) -> tuple[str, float]:
    """'ok <n bytes>' or the error message urllib gives (what img2dataset records)."""
    t = time.monotonic()
    try:
        with proxy.opener().open(url, timeout=timeout) as r:
            out = f"ok {len(r.read())}"
    except (urllib.error.URLError, OSError) as e:
        out = str(e)
    return out, time.monotonic() - t


def reason(message: str) -> str:
    got = classify_guard_error(message)
    return got[0] if got else message


def test_a_normal_image_passes_unchanged(servers, proxy) -> None:
    web, _ = servers
    out, _ = fetch(proxy, web.base_url + "/ok.png")
    assert out == f"ok {len(web.png)}"


@pytest.mark.parametrize("path", ["/drip", "/headers-drip"])
def test_a_byte_drip_ends_at_the_total_deadline(servers, proxy, path: str) -> None:
    web, _ = servers
    out, secs = fetch(proxy, web.base_url + path)
    assert reason(out) == "deadline_exceeded"
    assert "HTTP Error 504" in out and web.base_url + path in out
    # per-read timeouts would never fire: the bytes keep coming every 0.2 s
    assert DEADLINE * 0.9 <= secs < DEADLINE + 1.5


@pytest.mark.parametrize("path", ["/endless", "/big"])
def test_an_oversized_body_is_cut_at_the_cap(servers, proxy, path: str) -> None:
    web, _ = servers
    out, secs = fetch(proxy, web.base_url + path)
    assert reason(out) == "body_too_large"
    assert secs < DEADLINE


def test_the_proxy_memory_stays_bounded_on_endless_bodies(servers, proxy) -> None:
    web, _ = servers
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda _: fetch(proxy, web.base_url + "/endless")[0], range(16)))
    reasons = [reason(o) for o in outs]
    # The cap ends these bodies; on a machine starved by other jobs a transfer can hit the 1 s
    # deadline before the 256 KiB cap instead, which is the other bound doing its job.
    assert set(reasons) <= {"body_too_large", "deadline_exceeded"}
    assert "body_too_large" in reasons
    pid = proxy.pid
    status = Path(f"/proc/{pid}/status").read_text()
    peak_kb = int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1])
    assert peak_kb < 150 * 1024, f"proxy peak RSS {peak_kb} kB"


def test_a_redirect_to_another_loopback_port_is_refused(servers, proxy) -> None:
    web, internal = servers
    before = list(internal.hits)
    target = internal.base_url + "/ok.png"
    out, _ = fetch(proxy, f"{web.base_url}/redirect?to={target}")
    assert reason(out) == "blocked_address"
    assert classify_guard_error(out)[1] == target  # the hop that was refused
    assert internal.hits == before  # the internal service never saw a request


@pytest.mark.parametrize("target,expected", [
    ("ftp://127.0.0.1:21/x", "blocked_scheme"),  # urllib would follow ftp:// by itself
    ("file:///etc/passwd", "blocked_scheme"),  # urllib refuses this one on its own
])
def test_a_redirect_to_a_non_http_scheme_is_not_followed(servers, proxy, target, expected) -> None:
    web, _ = servers
    out, _ = fetch(proxy, f"{web.base_url}/redirect?to={target}")
    assert reason(out) == expected
    assert "root:" not in out


def test_non_http_urls_are_refused_by_the_proxy(proxy) -> None:
    for url in ("file:///etc/passwd", "ftp://127.0.0.1/x"):
        out, _ = fetch(proxy, url)
        assert reason(out) == "blocked_scheme", out
    # data: is routed to the proxy too and fails inside urllib (img2dataset catches any
    # exception), instead of being decoded locally
    with pytest.raises(TypeError):
        proxy.opener().open("data:text/plain;base64,aGVsbG8=", timeout=5)


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "0177.0.0.1", "127.1",
                                  "[::ffff:127.0.0.1]", "127.0.0.1.", "localhost"])
def test_odd_spellings_of_loopback_are_refused_even_on_the_allowed_port(servers, proxy,
                                                                        host) -> None:
    web, internal = servers
    for port in (web.port, internal.port):
        out, _ = fetch(proxy, f"http://{host}:{port}/ok.png")
        assert reason(out) == "blocked_address", out


def test_https_tunnels_are_guarded_too(servers, proxy) -> None:
    _, internal = servers
    out, _ = fetch(proxy, f"https://127.0.0.1:{internal.port}/ok.png")
    assert "Tunnel connection failed: 403" in out
    assert reason(out) == "blocked_address"


def test_refusals_are_logged_with_url(servers, proxy) -> None:
    web, internal = servers
    fetch(proxy, internal.base_url + "/logged.png")
    events = [e for e in proxy.events() if "reason" in e]
    assert any(e["reason"] == "blocked_address" and e["url"].endswith("/logged.png")
               for e in events)
    assert proxy.stats()["blocked_address"] >= 1


def test_per_domain_concurrency_cap(tmp_path) -> None:
    with HostileServer() as web:
        s = GuardSettings(deadline=5, allow_hosts=[f"127.0.0.1:{web.port}"],
                          per_domain_concurrency=2)
        with GuardProxy(s) as p, ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda _: fetch(p, web.base_url + "/sleep?s=0.2")[0], range(8)))
        assert all(o.startswith("ok") for o in outs), outs
        assert web.max_inflight == 2


def test_per_domain_rate(tmp_path) -> None:
    with HostileServer() as web:
        s = GuardSettings(deadline=5, allow_hosts=[f"127.0.0.1:{web.port}"], per_domain_rps=10)
        with GuardProxy(s) as p, ThreadPoolExecutor(6) as pool:
            t = time.monotonic()
            outs = list(pool.map(lambda _: fetch(p, web.base_url + "/ok.png")[0], range(6)))
            secs = time.monotonic() - t
        assert all(o.startswith("ok") for o in outs)
        assert secs >= 0.45  # 6 starts at 10/s: the last one no earlier than 0.5 s after


def test_crawl_delay_spaces_one_host_and_travels_in_a_settings_file(tmp_path) -> None:
    # 5,000 other hosts make the settings longer than one command-line argument may be:
    # they reach the proxy process through a file.
    intervals = {f"site{i}.example": 1.0 for i in range(5000)} | {"127.0.0.1": 0.3}
    with HostileServer() as web:
        s = GuardSettings(deadline=5, allow_hosts=[f"127.0.0.1:{web.port}"],
                          per_domain_rps=100, domain_intervals=intervals)
        assert len(json.dumps(s.__dict__)) > 64 * 1024
        with GuardProxy(s) as p, ThreadPoolExecutor(4) as pool:
            t = time.monotonic()
            outs = list(pool.map(lambda _: fetch(p, web.base_url + "/ok.png")[0], range(4)))
            secs = time.monotonic() - t
        assert all(o.startswith("ok") for o in outs), outs
        assert secs >= 0.85  # 4 starts 0.3 s apart (100/s alone would take 0.03 s)


def test_retry_after_slows_the_domain_and_fails_fast_beyond_the_deadline() -> None:
    with HostileServer(retry_after=1) as web, HostileServer(retry_after=3600) as web2:
        # Domains are hosts (ports of one host are one site): name web2 "localhost".
        s = GuardSettings(deadline=2, allow_hosts=[f"127.0.0.1:{web.port}",
                                                   f"localhost:{web2.port}"])
        base2 = f"http://localhost:{web2.port}"
        with GuardProxy(s) as p:
            out, _ = fetch(p, web.base_url + "/ratelimited")
            assert "HTTP Error 429" in out
            out, secs = fetch(p, web.base_url + "/ok.png")
            assert out.startswith("ok") and secs >= 0.8  # waited for Retry-After: 1
            fetch(p, base2 + "/ratelimited")
            out, secs = fetch(p, base2 + "/ok.png")
            assert reason(out) == "domain_busy" and secs < 0.5  # an hour: do not hold a thread
            out, secs = fetch(p, web.base_url + "/ok.png")  # other domains are unaffected
            assert out.startswith("ok") and secs < 0.5


def test_environment_routes_urllib_and_defeats_no_proxy(servers, proxy) -> None:
    _, internal = servers
    code = ("import urllib.request,sys\n"
            "try:\n urllib.request.urlopen(sys.argv[1], timeout=10); print('reached')\n"
            "except Exception as e: print(e)\n")
    saved = dict(os.environ)
    os.environ["no_proxy"] = "127.0.0.1,localhost"
    try:
        with proxy.environment():
            out = subprocess.run([sys.executable, "-c", code, internal.base_url + "/x.png"],
                                 capture_output=True, text=True, timeout=60).stdout
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert "witforge-guard blocked_address" in out
    assert "http_proxy" not in os.environ or os.environ["http_proxy"] == saved.get("http_proxy")


def test_settings_from_crawl_config() -> None:
    from pipeline.config import CrawlConfig

    c = CrawlConfig(request_deadline=3.5, max_body_bytes=1000, allow_hosts=["127.0.0.1:1"],
                    per_domain_concurrency=3, per_domain_rps=2.0)
    s = settings_from_crawl(c)
    assert (s.deadline, s.max_body_bytes, s.allow_hosts, s.per_domain_concurrency,
            s.per_domain_rps) == (3.5, 1000, ["127.0.0.1:1"], 3, 2.0)
    assert json.loads(json.dumps(s.__dict__))  # travels to the proxy process as JSON
