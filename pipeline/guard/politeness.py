"""Per-domain manners for the guarding proxy: a concurrency cap, a request rate (raised per
site to its robots.txt Crawl-delay), and backing off when a site answers 429/503 with
Retry-After.

Waiting is bounded by the request's own deadline: when a domain cannot take a request before
the deadline (it is backing off for a minute, or its slots stay busy), the request fails at
once with ``domain_busy`` instead of holding one of img2dataset's threads, so a manifest
dominated by one host cannot stall the crawl of the others. Idle domains are forgotten, so
memory follows the number of domains in flight, not the number ever seen.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from dataclasses import dataclass, field


class DomainBusy(Exception):
    """The domain cannot take this request before its deadline."""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    v = value.strip()
    if v.isdigit():
        return float(v)
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass
class _Domain:
    sem: asyncio.Semaphore
    users: int = 0  # holders + waiters; the entry is dropped when it returns to 0
    next_start: float = 0.0  # loop time before which no new request may start (rate)
    backoff_until: float = 0.0  # loop time set by 429/503 Retry-After
    stats: dict[str, int] = field(default_factory=dict)


class DomainPolicy:
    """The per-domain rules both limiters apply (this module's, in one process, and
    shared_limits.py's, across the processes on one port): the checked settings, each
    domain's spacing between starts, and the backoff a 429/503 asks for."""

    def __init__(self, concurrency: int, rps: float, max_backoff: float = 600.0,
                 default_backoff: float = 1.0,
                 intervals: dict[str, float] | None = None) -> None:
        if concurrency < 1:
            raise ValueError("crawl.per_domain_concurrency must be >= 1")
        if rps < 0:
            raise ValueError("crawl.per_domain_rps must be >= 0 (0 = unlimited)")
        self.concurrency = concurrency
        self.interval = 1.0 / rps if rps > 0 else 0.0
        # Per-domain spacing asked by the site itself (robots.txt Crawl-delay), when longer.
        self.intervals = {k: v for k, v in (intervals or {}).items() if v > self.interval}
        self.max_backoff = max_backoff
        self.default_backoff = default_backoff

    def interval_for(self, domain: str) -> float:
        return self.intervals.get(domain, self.interval)

    def backoff_seconds(self, status: int, retry_after: str | None) -> float:
        """How long a response tells us to leave its domain alone (0: it does not)."""
        if status not in (429, 503):
            return 0.0
        wait = parse_retry_after(retry_after)
        return self.default_backoff if wait is None else min(wait, self.max_backoff)


class DomainLimiter(DomainPolicy):
    """Concurrency and rate per domain for one asyncio loop."""

    def __init__(self, concurrency: int, rps: float, max_backoff: float = 600.0,
                 default_backoff: float = 1.0,
                 intervals: dict[str, float] | None = None) -> None:
        super().__init__(concurrency, rps, max_backoff, default_backoff, intervals)
        self._domains: dict[str, _Domain] = {}
        # Backoffs outlive the idle entries: a domain that said "come back in 30 s" must not
        # be forgotten just because nobody is asking it right now.
        self._backoff: dict[str, float] = {}
        self._calls = 0

    def _sweep(self) -> None:
        # Entries kept only for their rate spacing expire once that time has passed.
        now = asyncio.get_running_loop().time()
        for k in [k for k, d in self._domains.items() if d.users == 0 and d.next_start <= now]:
            del self._domains[k]
        for k in [k for k, t in self._backoff.items() if t <= now]:
            del self._backoff[k]

    def _enter(self, domain: str) -> _Domain:
        self._calls += 1
        if self._calls % 1024 == 0:
            self._sweep()
        d = self._domains.get(domain)
        if d is None:
            d = self._domains[domain] = _Domain(asyncio.Semaphore(self.concurrency))
        d.users += 1
        return d

    def _leave(self, domain: str, d: _Domain) -> None:
        d.users -= 1
        if d.users == 0 and d.next_start <= asyncio.get_running_loop().time():
            self._domains.pop(domain, None)

    def backoff_until(self, domain: str) -> float:
        until = self._backoff.get(domain, 0.0)
        if until and until <= asyncio.get_running_loop().time():
            self._backoff.pop(domain, None)
            return 0.0
        return until

    async def acquire(self, domain: str, deadline: float) -> _Domain:
        """Wait for a slot and the domain's next start time; raise DomainBusy if the wait
        would pass ``deadline`` (loop time). Pair with :meth:`release`."""
        loop = asyncio.get_running_loop()
        if self.backoff_until(domain) > deadline:
            raise DomainBusy(f"backing off until Retry-After ({domain})")
        d = self._enter(domain)
        if d.sem.locked():  # wait_for costs a task per call: only pay it when waiting
            try:
                await asyncio.wait_for(d.sem.acquire(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                self._leave(domain, d)
                raise DomainBusy(f"all {self.concurrency} slots busy until the deadline "
                                 f"({domain})") from None
        else:
            await d.sem.acquire()
        try:
            now = loop.time()
            start = max(now, d.next_start, self.backoff_until(domain))
            if start > deadline:
                raise DomainBusy(f"rate limit or Retry-After leaves no time ({domain})")
            d.next_start = start + self.interval_for(domain)
            if start > now:
                await asyncio.sleep(start - now)
        except BaseException:
            d.sem.release()
            self._leave(domain, d)
            raise
        return d

    def release(self, domain: str, d: _Domain) -> None:
        d.sem.release()
        self._leave(domain, d)

    def note_response(self, domain: str, status: int, retry_after: str | None) -> float:
        """Slow the domain down after a 429/503; returns the backoff applied (seconds)."""
        wait = self.backoff_seconds(status, retry_after)
        if not wait:
            return 0.0
        until = asyncio.get_running_loop().time() + wait
        self._backoff[domain] = max(self._backoff.get(domain, 0.0), until)
        return wait

    @property
    def active_domains(self) -> int:
        return len(self._domains)
