"""The guarding forward proxy: an asyncio HTTP proxy on loopback that img2dataset's workers
reach through ``http_proxy``/``https_proxy``.

Every request it forwards is checked and bounded:

* only http and https (and CONNECT for https); anything else is ``blocked_scheme``;
* the host is resolved here, once, and the address actually connected to must be a public
  unicast address unless ``host:port`` is on the allowlist (``blocked_address``);
* one total deadline for connect, headers and body together (``deadline_exceeded``), not per
  read — a server dripping a byte a second cannot hold a thread; waiting for the domain's turn
  is bounded by the same length, separately (``domain_busy``);
* a body cap (``body_too_large``), counted while reading, so an endless body costs at most the
  cap (spooled to disk past ``spool_bytes``);
* per-domain concurrency, rate and Retry-After backoff (``domain_busy``), see politeness.py.

For plain http the proxy reads the whole response before answering, so a failure is always a
clean status line whose reason phrase names it: ``HTTP/1.1 504 witforge-guard
deadline_exceeded http://...``. urllib turns that into ``HTTP Error 504: witforge-guard
deadline_exceeded http://...``, which img2dataset stores as the sample's error message. Redirects
are passed back to the client, which asks the proxy again for the next hop, so every hop is
guarded. For https the proxy only sees ``CONNECT host:port``: address, deadline, byte count and
domain limits still apply, but a cut mid-tunnel reaches the client as a broken connection; the
reason is then only in the event log.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import urlsplit

from pipeline.guard.addresses import (
    allow_key,
    blocked_kind,
    normalize_host,
    parse_allow_hosts,
    parse_ip_literal,
)
from pipeline.guard.politeness import DomainBusy, DomainLimiter
from pipeline.guard.shared_limits import SharedDomainLimiter
from pipeline.guard.wire import (
    CHUNK,
    HOP_BY_HOP,
    TAG,
    Refused,
    get_header,
    parse_head,
    parts_host,
    phrase,
    read_body,
)

_TUNNEL_SLACK = 64 * 1024  # TLS records and response headers on top of the body cap


@dataclass
class GuardSettings:
    deadline: float = 20.0
    max_body_bytes: int = 20 * 1024 * 1024
    allow_hosts: list[str] = field(default_factory=list)
    check_addresses: bool = True
    per_domain_concurrency: int = 8
    per_domain_rps: float = 0.0
    domain_intervals: dict[str, float] = field(default_factory=dict)  # host -> Crawl-delay
    max_backoff: float = 600.0
    spool_bytes: int = 1024 * 1024
    header_timeout: float = 10.0
    # processes on one port (SO_REUSEPORT), sharing the per-domain limits (shared_limits.py)
    processes: int = 1


class GuardServer:
    def __init__(self, settings: GuardSettings, events: IO[str] | None = None,
                 shared_limits: str = "") -> None:
        self.s = settings
        self.allow = parse_allow_hosts(settings.allow_hosts)
        rules = (settings.per_domain_concurrency, settings.per_domain_rps, settings.max_backoff)
        self.limiter = (SharedDomainLimiter(shared_limits, *rules,
                                            intervals=settings.domain_intervals)
                        if shared_limits else
                        DomainLimiter(*rules, intervals=settings.domain_intervals))
        self.events = events
        self.counts: dict[str, int] = {}

    # ---- bookkeeping -------------------------------------------------------------------
    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def _event(self, reason: str, url: str, detail: str = "") -> None:
        self._count(reason)
        if self.events is not None:
            self.events.write(json.dumps({"t": round(time.time(), 3), "reason": reason,
                                          "url": url, "detail": detail}) + "\n")

    # ---- connection entry --------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = ""
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"),
                                              self.s.header_timeout)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                    ConnectionError):
                return
            request_line, headers = parse_head(head)
            parts = request_line.split(" ")
            if len(parts) != 3:
                raise Refused(400, "bad_request", "malformed request line")
            method, target, _ = parts
            self._count("requests")
            if method == "CONNECT":
                await self._tunnel(target, reader, writer)
            else:
                await self._forward(method.upper(), target, headers, writer)
        except Refused as r:
            self._event(r.reason, target, r.detail)
            await self._refuse(writer, r, target)
        except (ConnectionError, TimeoutError):
            pass  # the client went away; nothing to tell it
        except asyncio.CancelledError:
            # the guard is stopping with requests in flight (the crawl was stopped): end them
            # quietly; Python 3.11's stream server would log each cancelled one as an error
            pass
        except Exception as e:  # a bug here must still end the request with a reason
            r = Refused(502, "guard_error", f"{type(e).__name__}: {e}")
            self._event(r.reason, target, r.detail)
            await self._refuse(writer, r, target)
        finally:
            writer.close()

    async def _refuse(self, writer: asyncio.StreamWriter, r: Refused, url: str) -> None:
        body = f"{TAG} {r.reason} {url}\n{r.detail}\n".encode("utf-8", "replace")
        head = (f"HTTP/1.1 {r.status} {phrase(f'{TAG} {r.reason} {url}')}\r\n"
                f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
                f"X-Witforge-Guard: {r.reason}\r\nConnection: close\r\n\r\n")
        try:
            writer.write(head.encode("latin-1") + body)
            await asyncio.wait_for(writer.drain(), 5)
        except (ConnectionError, TimeoutError):
            pass

    # ---- connecting, with the address guard ---------------------------------------------
    async def _open(self, host: str, port: int, url: str, ssl_host: str | None = None,
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        allowed = (allow_key(host), port) in self.allow
        check = self.s.check_addresses and not allowed
        literal = parse_ip_literal(host)
        if literal is not None:
            addrs = [str(literal)]
        else:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    normalize_host(host), port, type=1)  # SOCK_STREAM
            except OSError as e:
                raise Refused(502, "dns_error", f"{host}: {e}") from None
            addrs = list(dict.fromkeys(info[4][0] for info in infos))
        refusals = []
        last_error: OSError | None = None
        for addr in addrs:
            if check and (kind := blocked_kind(addr)):
                refusals.append(f"{addr} is {kind}")
                continue
            try:
                r, w = await asyncio.open_connection(addr, port, ssl=ssl_host is not None or None,
                                                     server_hostname=ssl_host)
            except OSError as e:
                last_error = e
                continue
            # Check the address the socket really reached, not the one we meant to reach.
            peer = w.get_extra_info("peername")[0]
            if check and (kind := blocked_kind(peer)):
                w.close()
                refusals.append(f"{peer} is {kind}")
                continue
            return r, w
        if refusals and last_error is None:
            raise Refused(403, "blocked_address", f"{host}:{port}: " + "; ".join(refusals))
        raise Refused(502, "connect_error", f"{host}:{port}: {last_error}")

    # ---- plain http (and https asked for as an absolute URL) ------------------------------
    async def _forward(self, method: str, url: str, headers: list[tuple[str, str]],
                       writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.s.deadline
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise Refused(403, "blocked_scheme", f"scheme {scheme or '(none)'} is not http(s)")
        if method not in ("GET", "HEAD"):
            raise Refused(405, "method_not_allowed", method)
        if not parts.hostname:
            raise Refused(400, "bad_request", "no host in the URL")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise Refused(400, "bad_request", "bad port") from None
        rest = url[len(parts.scheme) + 3:]
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        path = rest[cut:].split("#", 1)[0] or "/"
        if not path.startswith("/"):
            path = "/" + path
        domain = normalize_host(parts.hostname)
        try:
            slot = await self.limiter.acquire(domain, deadline)
        except DomainBusy as e:
            raise Refused(503, "domain_busy", str(e)) from None
        # Politeness waits are bounded separately (above); the fetch gets its full deadline.
        deadline = loop.time() + self.s.deadline
        spool = tempfile.SpooledTemporaryFile(max_size=self.s.spool_bytes)
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    status, reason, rheaders, size = await self._fetch(
                        method, parts.hostname, port, path, headers, url, spool,
                        ssl_host=parts.hostname if scheme == "https" else None)
            except TimeoutError:
                raise Refused(504, "deadline_exceeded",
                              f"no complete response within {self.s.deadline:g}s") from None
            except (EOFError, asyncio.LimitOverrunError, OSError) as e:
                raise Refused(502, "upstream_error", f"{type(e).__name__}: {e}") from None
            finally:
                self.limiter.release(domain, slot)
            self.limiter.note_response(domain, status, get_header(rheaders, "retry-after"))
            self._count("ok")
            await self._answer(writer, method, status, reason, rheaders, spool, size, deadline)
        finally:
            spool.close()

    async def _fetch(self, method: str, host: str, port: int, path: str,
                     headers: list[tuple[str, str]], url: str, spool: Any,
                     ssl_host: str | None) -> tuple[int, str, list[tuple[str, str]], int]:
        r, w = await self._open(host, port, url, ssl_host)
        try:
            drop = set(HOP_BY_HOP)
            for k, v in headers:
                if k.lower() == "connection":
                    drop |= {t.strip().lower() for t in v.split(",")}
            out = [f"{method} {path} HTTP/1.1"]
            out += [f"{k}: {v}" for k, v in headers if k.lower() not in drop]
            if get_header(headers, "host") is None:
                out.append(f"Host: {parts_host(host, port, ssl_host is not None)}")
            out.append("Connection: close")
            w.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
            await w.drain()
            while True:
                try:
                    head = await r.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                    raise Refused(502, "bad_response", f"no valid response head: {e}") from None
                status_line, rheaders = parse_head(head)
                bits = status_line.split(" ", 2)
                if len(bits) < 2 or not bits[0].startswith("HTTP/") or not bits[1].isdigit():
                    raise Refused(502, "bad_response", f"bad status line {status_line[:80]!r}")
                status = int(bits[1])
                if status >= 200 or status == 101:
                    break  # 1xx interim responses are skipped
            reason = bits[2] if len(bits) > 2 else ""
            size = await read_body(r, method, status, rheaders, spool, self.s.max_body_bytes)
            return status, reason, rheaders, size
        finally:
            w.close()

    async def _answer(self, writer: asyncio.StreamWriter, method: str, status: int,
                      reason: str, headers: list[tuple[str, str]], spool: Any, size: int,
                      deadline: float) -> None:
        keep = [(k, v) for k, v in headers
                if k.lower() not in HOP_BY_HOP and (method == "HEAD" or
                                                      k.lower() != "content-length")]
        lines = [f"HTTP/1.1 {status} {phrase(reason) or 'Status'}"]
        lines += [f"{k}: {v}" for k, v in keep]
        if method != "HEAD":
            lines.append(f"Content-Length: {size}")
        lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        spool.seek(0)
        # The client gets as long again as the request had: a stuck reader must not pin the
        # spooled body forever.
        async with asyncio.timeout(self.s.deadline):
            while chunk := spool.read(CHUNK):
                writer.write(chunk)
                await writer.drain()
            await writer.drain()

    # ---- https: CONNECT tunnels ----------------------------------------------------------
    async def _tunnel(self, target: str, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.s.deadline
        host, sep, port_s = target.rpartition(":")
        if not sep or not port_s.isdigit() or not host:
            raise Refused(400, "bad_request", f"CONNECT needs host:port, got {target!r}")
        host, port = host.strip("[]"), int(port_s)
        domain = normalize_host(host)
        try:
            slot = await self.limiter.acquire(domain, deadline)
        except DomainBusy as e:
            raise Refused(503, "domain_busy", str(e)) from None
        deadline = loop.time() + self.s.deadline
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    ur, uw = await self._open(host, port, target)
            except TimeoutError:
                raise Refused(504, "deadline_exceeded", "connect took too long") from None
            self._count("tunnels")
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            outcome = await self._pump(reader, writer, ur, uw, deadline)
            if outcome:
                self._event(outcome, f"https://{target}/", "tunnel cut")
        finally:
            self.limiter.release(domain, slot)

    async def _pump(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter,
                    ur: asyncio.StreamReader, uw: asyncio.StreamWriter, deadline: float) -> str:
        cap = self.s.max_body_bytes + _TUNNEL_SLACK
        outcome = ""

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, capped: bool):
            nonlocal outcome
            total = 0
            while data := await src.read(CHUNK):
                total += len(data)
                if capped and total > cap:
                    outcome = "body_too_large"
                    return
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()

        up = asyncio.ensure_future(copy(ur, cw, True))
        down = asyncio.ensure_future(copy(cr, uw, False))
        try:
            async with asyncio.timeout_at(deadline):
                await up  # the response side decides when the exchange is over
        except TimeoutError:
            outcome = "deadline_exceeded"
        except (ConnectionError, OSError):
            pass
        finally:
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            uw.close()
        return outcome


async def serve(settings: GuardSettings, host: str, port: int, events: IO[str] | None,
                stop: asyncio.Event, on_ready: Any = None, shared_limits: str = "",
                reuse_port: bool = False) -> GuardServer:
    guard = GuardServer(settings, events, shared_limits)
    server = await asyncio.start_server(guard.handle, host, port, limit=64 * 1024, backlog=1024,
                                        reuse_port=reuse_port or None)
    if on_ready is not None:
        on_ready(server.sockets[0].getsockname()[:2])
    async with server:
        await stop.wait()
    return guard
