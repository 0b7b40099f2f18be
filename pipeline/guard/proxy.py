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
from pipeline.guard.shared_limits import create_table
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
        processes=int(crawl.guard_processes),
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
        self._procs: list[subprocess.Popen[bytes]] = []
        self.address: tuple[str, int] | None = None
        self._events_from: dict[Path, int] = {}  # the logs are appended to; this run's start
        self._limits: Path | None = None  # the shared limits table of several processes
        self._settings_file: Any = None  # settings too long for the command line

    @property
    def url(self) -> str:
        if self.address is None:
            raise RuntimeError("the guard proxy is not running")
        return f"http://{self.address[0]}:{self.address[1]}"

    def start(self) -> GuardProxy:
        """Start the proxy: ``settings.processes`` processes on one port (SO_REUSEPORT) with
        shared per-domain limits when more than one."""
        if self.events_path is not None:
            self.events_path.parent.mkdir(parents=True, exist_ok=True)
            self._events_from = {p: p.stat().st_size if p.exists() else 0
                                 for p in self.event_files()}
        settings = json.dumps(asdict(self.settings))
        if len(settings) > _MAX_ARG:  # one argv string is capped at 128 KiB on Linux
            self._settings_file = tempfile.NamedTemporaryFile(
                "w", suffix=".json", prefix="guard-settings-", encoding="utf-8")
            self._settings_file.write(settings)
            self._settings_file.flush()
            settings = "@" + self._settings_file.name
        extra = []
        if self.processes > 1:
            self._limits = create_table()
            extra = ["--reuse-port", "--shared-limits", str(self._limits)]
        port = self.port
        for i in range(self.processes):
            proc = self._spawn(settings, port, extra, i)
            self._procs.append(proc)
            line = self._read_ready_line(proc)
            host, _, got = line.rsplit(" ", 1)[-1].rpartition(":")
            self.address, port = (host, int(got)), int(got)
        return self

    @property
    def processes(self) -> int:
        return max(1, int(self.settings.processes))

    def event_files(self) -> list[Path]:
        """Process 0 logs to events_path, process i to <stem>.p<i>.jsonl beside it."""
        if self.events_path is None:
            return []
        p = self.events_path
        return [p] + [p.with_name(f"{p.stem}.p{i}{p.suffix}") for i in range(1, self.processes)]

    def _spawn(self, settings: str, port: int, extra: list[str],
               i: int) -> subprocess.Popen[bytes]:
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "pipeline.guard", "--watch-stdin",
               "--port", str(port), "--settings", settings, *extra]
        if self.events_path is not None:
            cmd += ["--events", str(self.event_files()[i])]
        log = open(self.log_path, "ab") if self.log_path is not None else None
        try:
            return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=log, env=env, start_new_session=self.new_session)
        finally:
            if log is not None:
                log.close()  # the child has its own copy

    def _read_ready_line(self, proc: subprocess.Popen[bytes]) -> str:
        import select

        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], self.start_timeout)
        line = proc.stdout.readline().decode().strip() if ready else ""
        if not line.startswith(f"{TAG} listening "):
            self.stop()
            raise RuntimeError(f"the guard proxy did not start (got {line!r}; see stderr)")
        return line

    @property
    def pid(self) -> int | None:
        return self._procs[0].pid if self._procs else None

    def exit_code(self) -> int | None:
        """None while every process of the proxy runs, else the first one's exit status
        (negative: killed by a signal)."""
        if not self._procs:
            raise RuntimeError("the guard proxy was never started")
        for proc in self._procs:
            code = proc.poll()
            if code is not None:
                return code
        return None

    def stop(self) -> None:
        if self._settings_file is not None:
            self._settings_file.close()  # deletes it
            self._settings_file = None
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for f in (proc.stdin, proc.stdout):
                if f is not None:
                    f.close()
        if self._limits is not None:
            self._limits.unlink(missing_ok=True)
            self._limits = None

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
        """The refusal events logged so far (and the summaries once stopped), every process's."""
        out = []
        for path in self.event_files():
            if not path.exists():
                continue
            with open(path, "rb") as f:
                f.seek(self._events_from.get(path, 0))
                lines = f.read().decode("utf-8", "replace").splitlines()
            out += [json.loads(x) for x in lines if x.strip()]
        return out

    def stats(self) -> dict[str, Any]:
        """Counts by reason from the event logs: once stopped, the processes' summary lines
        added up (with their cpu_seconds, and the largest peak_rss_kb)."""
        events = self.events()
        summaries = [e for e in events if "summary" in e]
        if summaries and len(summaries) >= self.processes:
            total: dict[str, Any] = {}
            for e in summaries:
                for k, v in e["summary"].items():
                    total[k] = total.get(k, 0) + v
            total["cpu_seconds"] = round(sum(e.get("cpu_seconds") or 0 for e in summaries), 3)
            total["peak_rss_kb"] = max((e.get("peak_rss_kb") or 0 for e in summaries),
                                       default=None)
            return total
        counts: dict[str, Any] = {}
        for e in events:
            if "reason" in e:
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
