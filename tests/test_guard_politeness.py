"""Per-domain politeness and the CONNECT tunnel's bounds (what https requests get)."""

from __future__ import annotations

import asyncio
import email.utils
import http.client
import time

import pytest

from pipeline.guard.hostile import HostileServer
from pipeline.guard.politeness import DomainBusy, DomainLimiter, parse_retry_after
from pipeline.guard.proxy import GuardProxy
from pipeline.guard.server import GuardSettings


def test_retry_after_forms() -> None:
    assert parse_retry_after("120") == 120.0
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= parse_retry_after(later) <= 31
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_limiter_forgets_idle_domains_and_fails_fast_on_long_backoff() -> None:
    async def scenario() -> None:
        lim = DomainLimiter(concurrency=2, rps=0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1
        slots = [(f"d{i}.example", await lim.acquire(f"d{i}.example", deadline))
                 for i in range(100)]
        assert lim.active_domains == 100
        for domain, slot in slots:
            lim.release(domain, slot)
        assert lim.active_domains == 0  # memory follows domains in flight, not domains seen
        assert lim.note_response("slow.example", 429, "3600") == 600.0  # capped
        t = loop.time()
        with pytest.raises(DomainBusy):
            await lim.acquire("slow.example", loop.time() + 1)
        assert loop.time() - t < 0.1
        a = await lim.acquire("busy.example", loop.time() + 1)
        b = await lim.acquire("busy.example", loop.time() + 1)
        with pytest.raises(DomainBusy, match="slots busy"):
            await lim.acquire("busy.example", loop.time() + 0.2)
        lim.release("busy.example", a)
        lim.release("busy.example", b)

    asyncio.run(scenario())


def _tunnel_get(proxy: GuardProxy, port: int, path: str) -> tuple[str, float]:
    # Plain HTTP inside a CONNECT tunnel: the proxy sees exactly what it sees of https.
    host, pport = proxy.address
    conn = http.client.HTTPConnection(host, pport, timeout=20)
    conn.set_tunnel("127.0.0.1", port)
    t = time.monotonic()
    try:
        conn.request("GET", path)
        body = conn.getresponse().read()
        out = f"ok {len(body)}"
    except (http.client.HTTPException, OSError) as e:
        out = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return out, time.monotonic() - t


def test_tunnels_are_cut_at_the_deadline_and_the_byte_cap(tmp_path) -> None:
    with HostileServer(drip_interval=0.2) as web:
        s = GuardSettings(deadline=1.0, max_body_bytes=100_000,
                          allow_hosts=[f"127.0.0.1:{web.port}"])
        with GuardProxy(s, events_path=tmp_path / "events.jsonl") as p:
            ok, _ = _tunnel_get(p, web.port, "/ok.png")
            drip, drip_secs = _tunnel_get(p, web.port, "/drip")
            endless, endless_secs = _tunnel_get(p, web.port, "/endless")
        assert ok == f"ok {len(web.png)}"
        assert not drip.startswith("ok") and 0.9 <= drip_secs < 2.5
        # Cut at the cap (plus 64 KiB for TLS and headers), fast. A body without a length
        # that is cut looks complete to the client: the reason is only in the event log (and
        # a truncated image then fails to decode in img2dataset).
        assert endless_secs < 1.0
        assert not endless.startswith("ok") or int(endless.split()[1]) <= 100_000 + 65536
        reasons = {e["reason"] for e in p.events() if "reason" in e}
        assert {"deadline_exceeded", "body_too_large"} <= reasons
        assert p.stats()["tunnels"] == 3
