"""Start and stop the guarding proxy, and hand it to img2dataset.

    with GuardProxy(cfg.crawl, events_path=work / "guard.jsonl") as proxy:
        with proxy.environment():          # http_proxy/https_proxy/... for child processes
            img2dataset.download(...)
        print(proxy.stats())

The proxy runs in its own process so that its event loop never competes with the crawl's
Python threads for a GIL, and so a crash in either cannot take the other down. It exits when
its stdin closes, so it never outlives the process that started it; with ``log_path`` its
stderr (a traceback if it crashes) goes to that file.

:func:`classify_guard_error` turns an img2dataset error message back into the guard's reason
and URL, for the crawl stage's ledger.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.guard.server import GuardSettings
from pipeline.guard.wire import TAG

# Schemes urllib could open without the network or behind our back: routing them to the proxy
# makes it refuse them (blocked_scheme) instead of urllib reading a local file or an FTP site.
_PROXIED_SCHEMES = ("http", "https", "ftp", "file", "data")
_REASON_RE = re.compile(re.escape(TAG) + r" ([a-z_]+)(?: (\S+))?")
_URLLIB_REDIRECT_RE = re.compile(r"Redirection to url '([^']*)' is not allowed")

_MAX_ARG = 64 * 1024

GUARD_REASONS = ("blocked_address", "blocked_scheme", "deadline_exceeded", "body_too_large",
                 "domain_busy", "dns_error", "connect_error", "upstream_error", "bad_response",
                 "method_not_allowed", "bad_request", "guard_error")


def settings_from_crawl(crawl: Any, **overrides: Any) -> GuardSettings:
    """GuardSettings from a CrawlConfig (pipeline.config), with optional overrides."""
    s = GuardSettings(
        deadline=float(crawl.request_deadline),
        max_body_bytes=int(crawl.max_body_bytes),
        allow_hosts=list(crawl.allow_hosts),
        per_domain_concurrency=int(crawl.per_domain_concurrency),
        per_domain_rps=float(crawl.per_domain_rps),
    )
    for k, v in overrides.items():
        setattr(s, k, v)
    return s


def client_timeout(settings: GuardSettings) -> int:
    """The per-read timeout img2dataset should use behind the proxy: the proxy answers only
    once the whole body is in (after at most one deadline waiting for the domain's turn and
    one fetching), so the client must wait a little longer to hear the proxy's reason
    instead of timing out on its own."""
    return int(math.ceil(2 * settings.deadline)) + 5


def classify_guard_error(message: str | None) -> tuple[str, str] | None:
    """(reason, url) if an error message came from the guard, else None.

    Matches both ``HTTP Error 403: witforge-guard blocked_address http://...`` (http) and
    ``<urlopen error Tunnel connection failed: 403 witforge-guard blocked_address h:443>``."""
    if not message:
        return None
    m = _REASON_RE.search(message)
    if m is None:
        # urllib itself refuses redirects to schemes other than http/https/ftp (file://).
        r = _URLLIB_REDIRECT_RE.search(message)
        return ("blocked_scheme", r.group(1)) if r else None
    return m.group(1), (m.group(2) or "").rstrip(">")


class GuardProxy:
    """The guarding proxy as a child process on 127.0.0.1 (a context manager)."""

    def __init__(self, settings: GuardSettings | Any, events_path: str | Path | None = None,
                 port: int = 0, start_timeout: float = 30.0,
                 log_path: str | Path | None = None, new_session: bool = False) -> None:
        if not isinstance(settings, GuardSettings):
            settings = settings_from_crawl(settings)
        self.settings = settings
        self.events_path = Path(events_path) if events_path else None
        self.log_path = Path(log_path) if log_path else None
        self.port = port
        self.start_timeout = start_timeout
        self.new_session = new_session
        self._proc: subprocess.Popen[bytes] | None = None
        self.address: tuple[str, int] | None = None
        self._events_from = 0  # the event log is appended to; this run starts here
        self._settings_file: Any = None  # settings too long for the command line

    @property
    def url(self) -> str:
        if self.address is None:
            raise RuntimeError("the guard proxy is not running")
        return f"http://{self.address[0]}:{self.address[1]}"

    def start(self) -> GuardProxy:
        if self.events_path is not None:
            self.events_path.parent.mkdir(parents=True, exist_ok=True)
            self._events_from = (self.events_path.stat().st_size
                                 if self.events_path.exists() else 0)
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        settings = json.dumps(asdict(self.settings))
        if len(settings) > _MAX_ARG:  # one argv string is capped at 128 KiB on Linux
            self._settings_file = tempfile.NamedTemporaryFile(
                "w", suffix=".json", prefix="guard-settings-", encoding="utf-8")
            self._settings_file.write(settings)
            self._settings_file.flush()
            settings = "@" + self._settings_file.name
        cmd = [sys.executable, "-m", "pipeline.guard", "--watch-stdin",
               "--port", str(self.port), "--settings", settings]
        if self.events_path is not None:
            cmd += ["--events", str(self.events_path)]
        log = open(self.log_path, "ab") if self.log_path is not None else None
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=log, env=env,
                                          start_new_session=self.new_session)
        finally:
            if log is not None:
                log.close()  # the child has its own copy
        line = self._read_ready_line()
        host, _, port = line.rsplit(" ", 1)[-1].rpartition(":")
        self.address = (host, int(port))
        return self

    def _read_ready_line(self) -> str:
        import select

        assert self._proc is not None and self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], self.start_timeout)
        line = self._proc.stdout.readline().decode().strip() if ready else ""
        if not line.startswith(f"{TAG} listening "):
            self.stop()
            raise RuntimeError(f"the guard proxy did not start (got {line!r}; see stderr)")
        return line

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def exit_code(self) -> int | None:
        """None while the proxy runs, else its exit status (negative: killed by a signal)."""
        if self._proc is None:
            raise RuntimeError("the guard proxy was never started")
        return self._proc.poll()

    def stop(self) -> None:
        if self._settings_file is not None:
            self._settings_file.close()  # deletes it
            self._settings_file = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()

    def __enter__(self) -> GuardProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """Environment variables that route every urllib request through the proxy."""
        out = {}
        for scheme in _PROXIED_SCHEMES:
            out[f"{scheme}_proxy"] = self.url
            out[f"{scheme.upper()}_PROXY"] = self.url
        return out

    @contextmanager
    def environment(self) -> Iterator[dict[str, str]]:
        """Set the proxy variables in os.environ (inherited by spawned img2dataset workers)
        and remove no_proxy, which would let loopback or listed hosts bypass the guard."""
        saved = dict(os.environ)
        os.environ.update(self.env())
        for k in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
            os.environ.pop(k, None)
        # urllib caches the first opener it builds (with the proxies of that moment).
        urllib.request.install_opener(None)  # type: ignore[arg-type]
        try:
            yield self.env()
        finally:
            os.environ.clear()
            os.environ.update(saved)
            urllib.request.install_opener(None)  # type: ignore[arg-type]

    def opener(self) -> urllib.request.OpenerDirector:
        """A urllib opener that goes through this proxy (for in-process fetches, e.g. robots)."""
        return urllib.request.build_opener(
            urllib.request.ProxyHandler({s: self.url for s in _PROXIED_SCHEMES}))

    def events(self) -> list[dict[str, Any]]:
        """The refusal events logged so far (and the summary once stopped)."""
        if self.events_path is None or not self.events_path.exists():
            return []
        with open(self.events_path, "rb") as f:
            f.seek(self._events_from)
            lines = f.read().decode("utf-8", "replace").splitlines()
        return [json.loads(x) for x in lines if x.strip()]

    def stats(self) -> dict[str, Any]:
        """Counts by reason from the event log (the summary line once the proxy stopped, with
        the proxy's cpu_seconds and peak_rss_kb)."""
        counts: dict[str, Any] = {}
        for e in self.events():
            if "summary" in e:
                return {**e["summary"], "cpu_seconds": e.get("cpu_seconds"),
                        "peak_rss_kb": e.get("peak_rss_kb")}
            counts[e["reason"]] = counts.get(e["reason"], 0) + 1
        return counts


def crawl_timeout(crawl: Any) -> int:
    """img2dataset's ``timeout`` for a crawl: behind the guard it must outlast the proxy's own
    bounds (see client_timeout); without the guard it is crawl.timeout as configured."""
    if not crawl.guard:
        return int(crawl.timeout)
    return max(int(crawl.timeout), client_timeout(settings_from_crawl(crawl)))


@contextmanager
def guarded_env(crawl: Any, env: dict[str, str], events_path: str | Path | None = None,
                domain_intervals: dict[str, float] | None = None,
                log_path: str | Path | None = None,
                ) -> Iterator[tuple[dict[str, str], GuardProxy | None]]:
    """(``env`` routed through a running GuardProxy, the proxy) when ``crawl.guard`` is on
    (the proxy lives as long as the ``with`` block); (``env`` unchanged, None) when it is off.
    ``domain_intervals``: seconds between two requests to a host (robots.txt Crawl-delay)."""
    if not crawl.guard:
        yield env, None
        return
    settings = settings_from_crawl(crawl, domain_intervals=dict(domain_intervals or {}))
    with GuardProxy(settings, events_path=events_path, log_path=log_path) as proxy:
        out = {k: v for k, v in env.items()
               if k.lower() not in ("no_proxy", "all_proxy") and not k.lower().endswith("_proxy")}
        out.update(proxy.env())
        yield out, proxy
