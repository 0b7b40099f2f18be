"""Per-domain limits shared by several guard processes on one port (``crawl.guard_processes``).

One guard process is one asyncio loop on one core; past its ceiling (bench/bench_guard_ceiling.py)
a node runs several, all listening on the same port with SO_REUSEPORT (the kernel spreads the
connections). Their per-domain concurrency, rate, Crawl-delay and Retry-After backoff must still
hold for the node as a whole, so they live in one small table in shared memory instead of each
process's :class:`~pipeline.guard.politeness.DomainLimiter`:

* the table is a file mapped by every process (``/dev/shm`` when there is one): ``SLOTS``
  records of (requests in flight, next start time, backoff until), a domain's record chosen
  by a hash of its name;
* every read-modify-write holds an ``flock`` on that file, for microseconds, never across an
  ``await``; times are ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for every process of
  the host, and asyncio's loop.time());
* a request waiting for a free slot polls (2 ms, doubling to 50 ms) until its deadline, then
  fails as ``domain_busy`` like the in-process limiter.

Two domains hashing to one record share its limits (stricter than asked, never looser): with
65,536 records and a few hundred domains in flight at once that is rare, and it never lets a
domain exceed its own limits.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import mmap
import os
import struct
import tempfile
import time
from pathlib import Path

from pipeline.guard.politeness import DomainBusy, DomainPolicy

SLOTS = 65536
_RECORD = struct.Struct("=idd")  # in flight, next start, backoff until
SIZE = SLOTS * _RECORD.size


def create_table(folder: str | Path | None = None) -> Path:
    """A new zeroed table file; the caller removes it when the guard group stops."""
    where = folder or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    fd, name = tempfile.mkstemp(prefix="witforge-guard-limits-", dir=where)
    try:
        os.ftruncate(fd, SIZE)
    finally:
        os.close(fd)
    return Path(name)


class SharedDomainLimiter(DomainPolicy):
    """DomainLimiter's interface over the shared table at ``path``."""

    def __init__(self, path: str | Path, concurrency: int, rps: float,
                 max_backoff: float = 600.0, default_backoff: float = 1.0,
                 intervals: dict[str, float] | None = None) -> None:
        super().__init__(concurrency, rps, max_backoff, default_backoff, intervals)
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, SIZE)

    @staticmethod
    def _offset(domain: str) -> int:
        h = hashlib.blake2b(domain.encode(), digest_size=8).digest()
        return (int.from_bytes(h, "little") % SLOTS) * _RECORD.size

    def _update(self, domain: str, fn):  # noqa: ANN001, ANN202 - (record) -> (record, result)
        off = self._offset(domain)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            record, result = fn(*_RECORD.unpack_from(self._map, off))
            _RECORD.pack_into(self._map, off, *record)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return result

    def backoff_until(self, domain: str) -> float:
        return self._update(domain, lambda n, nxt, back: ((n, nxt, back), back))

    async def acquire(self, domain: str, deadline: float) -> str:
        """Wait for a slot and the domain's next start time (as DomainLimiter.acquire);
        raise DomainBusy if the wait would pass ``deadline`` (monotonic time)."""
        interval = self.interval_for(domain)
        if self.backoff_until(domain) > deadline:
            raise DomainBusy(f"backing off until Retry-After ({domain})")

        def take(n: int, nxt: float, back: float):  # noqa: ANN202
            if n >= self.concurrency:
                return (n, nxt, back), None
            start = max(time.monotonic(), nxt, back)
            if start > deadline:
                return (n, nxt, back), -1.0
            return (n + 1, start + interval, back), start

        pause = 0.002
        while True:
            start = self._update(domain, take)
            if start is not None:
                break
            if time.monotonic() + pause > deadline:
                raise DomainBusy(f"all {self.concurrency} slots busy until the deadline "
                                 f"({domain})")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)
        if start < 0:
            raise DomainBusy(f"rate limit or Retry-After leaves no time ({domain})")
        wait = start - time.monotonic()
        if wait > 0:
            try:
                await asyncio.sleep(wait)
            except BaseException:
                self.release(domain, domain)
                raise
        return domain

    def release(self, domain: str, token: str) -> None:
        self._update(domain, lambda n, nxt, back: ((max(0, n - 1), nxt, back), None))

    def note_response(self, domain: str, status: int, retry_after: str | None) -> float:
        wait = self.backoff_seconds(status, retry_after)
        if not wait:
            return 0.0
        until = time.monotonic() + wait
        self._update(domain, lambda n, nxt, back: ((n, nxt, max(back, until)), None))
        return wait

    @property
    def active_domains(self) -> int:
        return sum(1 for off in range(0, SIZE, _RECORD.size)
                   if _RECORD.unpack_from(self._map, off)[0] > 0)
