"""Several guard processes on one port (``crawl.guard_processes``): the kernel spreads the
connections over them (SO_REUSEPORT), and the per-domain limits hold for all of them together
(pipeline/guard/shared_limits.py)."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.guard.hostile import HostileServer
from pipeline.guard.politeness import DomainBusy
from pipeline.guard.proxy import GuardProxy
from pipeline.guard.server import GuardSettings
from pipeline.guard.shared_limits import SharedDomainLimiter, create_table
from tests.test_guard_proxy import fetch


def test_two_limiters_on_one_table_share_concurrency_rate_and_backoff(tmp_path) -> None:
    """Two instances stand for two processes: what one holds, the other sees."""
    table = create_table(tmp_path)

    async def scenario() -> None:
        a = SharedDomainLimiter(table, concurrency=2, rps=0)
        b = SharedDomainLimiter(table, concurrency=2, rps=0)
        now = time.monotonic()
        ta = await a.acquire("x.example", now + 1)
        tb = await b.acquire("x.example", now + 1)
        assert a.active_domains == b.active_domains == 1
        t = time.monotonic()
        with pytest.raises(DomainBusy, match="slots busy"):
            await a.acquire("x.example", time.monotonic() + 0.2)
        assert 0.15 < time.monotonic() - t < 0.5  # it waited for its deadline, then gave up
        other = await a.acquire("y.example", time.monotonic() + 1)  # another domain is free
        waiter = asyncio.ensure_future(b.acquire("x.example", time.monotonic() + 2))
        await asyncio.sleep(0.05)
        a.release("x.example", ta)  # a slot freed in "process" a lets b's waiter in
        await asyncio.wait_for(waiter, 1)
        for lim, tok, dom in ((b, tb, "x.example"), (b, waiter.result(), "x.example"),
                              (a, other, "y.example")):
            lim.release(dom, tok)
        assert a.active_domains == 0

        a.note_response("slow.example", 429, "30")  # a Retry-After seen by a holds b back
        with pytest.raises(DomainBusy, match="Retry-After"):
            await b.acquire("slow.example", time.monotonic() + 1)

        r1 = SharedDomainLimiter(table, concurrency=8, rps=10)
        r2 = SharedDomainLimiter(table, concurrency=8, rps=10)
        t = time.monotonic()
        toks = [await lim.acquire("rate.example", t + 5) for lim in (r1, r2, r1, r2, r1)]
        assert time.monotonic() - t >= 0.38  # 5 starts at 10/s between them: >= 0.4 s
        for tok in toks:
            r1.release("rate.example", tok)

    asyncio.run(scenario())


def test_guard_processes_share_one_port_and_one_concurrency_cap(tmp_path) -> None:
    with HostileServer() as web:
        s = GuardSettings(deadline=5, allow_hosts=[f"127.0.0.1:{web.port}"],
                          per_domain_concurrency=2, processes=2)
        with GuardProxy(s, events_path=tmp_path / "guard.jsonl") as p, \
                ThreadPoolExecutor(8) as pool:
            assert len(p.event_files()) == 2 and p.exit_code() is None
            slow = list(pool.map(lambda _: fetch(p, web.base_url + "/sleep?s=0.2")[0],
                                 range(8)))
            fast = list(pool.map(lambda _: fetch(p, web.base_url + "/ok.png")[0], range(64)))
        assert all(o.startswith("ok") for o in slow + fast), slow + fast
        assert web.max_inflight == 2  # the cap held across both processes
        per_process = [json.loads(f.read_text().splitlines()[-1])["summary"]
                       for f in p.event_files()]
        # 72 connections spread by the kernel: both processes served some
        assert all(c.get("requests", 0) > 0 for c in per_process), per_process
        assert sum(c["requests"] for c in per_process) == 72
        assert p.stats()["requests"] == 72 and p.stats()["ok"] == 72
