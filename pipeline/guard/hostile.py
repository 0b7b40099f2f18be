"""A hostile web server on 127.0.0.1 for the guard's tests and benchmark.

It serves the faults of the real web that hurt an unguarded crawler, each at a fixed path:

    /ok.png              a real PNG image (tiny)
    /drip                headers, then one byte every ``drip_interval`` seconds, forever
    /endless             a 200 with no length that never stops sending
    /big                 a Content-Length larger than any sane cap
    /redirect?to=URL     302 to URL (another loopback port, ftp://, file://, ...)
    /ratelimited         429 with Retry-After: ``retry_after``
    /robots.txt          disallows /private/ for witforge, everything for "badbot"; with
                         ``crawl_delay`` it asks witforge for that Crawl-delay
    /private/x.png       an image that robots.txt forbids
    /headers-drip        sends the status line and then drips headers
    /sleep?s=0.3         an image after a pause (counts requests in flight: ``max_inflight``)

A second instance on another port stands in for the "internal service" a redirect must never
reach. Only ever binds to loopback.
"""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

ROBOTS = b"""User-agent: badbot
Disallow: /

User-agent: witforge
Disallow: /private/
Allow: /private/ok.png

User-agent: *
Disallow: /nobody/
"""


def tiny_png(color: tuple[int, int, int] = (200, 30, 30), size: int = 32) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HostileServer  # type: ignore[assignment]

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str = "image/png",
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        srv = self.server
        srv.hit_times.append((time.monotonic(), self.path))
        url = urlsplit(self.path)
        path = url.path
        try:
            if path in ("/ok.png", "/private/x.png", "/private/ok.png", "/nobody/x.png") or \
                    path.startswith("/img/"):
                self._send(200, srv.png)
            elif path == "/robots.txt":
                if srv.robots_status == 200:
                    delay = f"Crawl-delay: {srv.crawl_delay}\n" if srv.crawl_delay else ""
                    self._send(200, ROBOTS.replace(b"User-agent: witforge\n", (
                        "User-agent: witforge\n" + delay).encode()), "text/plain")
                else:
                    self._send(srv.robots_status, b"no robots here", "text/plain")
            elif path == "/sleep":
                with srv.lock:
                    srv.inflight += 1
                    srv.max_inflight = max(srv.max_inflight, srv.inflight)
                try:
                    srv.closing.wait(float(parse_qs(url.query).get("s", ["0.3"])[0]))
                finally:
                    with srv.lock:
                        srv.inflight -= 1
                self._send(200, srv.png)
            elif path == "/drip":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", "50000")  # under any cap: only time ends it
                self.end_headers()
                while not srv.closing.is_set():
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    srv.closing.wait(srv.drip_interval)
            elif path == "/headers-drip":
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                while not srv.closing.is_set():
                    self.wfile.write(b"X-a: b\r\n")
                    self.wfile.flush()
                    srv.closing.wait(srv.drip_interval)
            elif path == "/endless":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Connection", "close")
                self.end_headers()
                chunk = b"\0" * 65536
                while not srv.closing.is_set():
                    self.wfile.write(chunk)
            elif path == "/big":
                self.send_response(200)
                self.send_header("Content-Length", str(10**12))
                self.end_headers()
                self.wfile.write(b"\0" * 1024)
            elif path == "/redirect":
                to = parse_qs(url.query).get("to", ["/ok.png"])[0]
                self._send(302, b"", "text/plain", {"Location": to})
            elif path == "/ratelimited":
                self._send(429, b"slow down", "text/plain",
                           {"Retry-After": str(srv.retry_after)})
            else:
                self._send(404, b"not found", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            pass


class HostileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int = 0, drip_interval: float = 1.0, retry_after: int = 2,
                 robots_status: int = 200, crawl_delay: float = 0):
        super().__init__(("127.0.0.1", port), _Handler)
        self.robots_status = robots_status
        self.crawl_delay = crawl_delay  # > 0: robots.txt asks witforge for this Crawl-delay
        self.lock = threading.Lock()
        self.inflight = self.max_inflight = 0
        self.drip_interval = drip_interval
        self.retry_after = retry_after
        self.png = tiny_png()
        self.hit_times: list[tuple[float, str]] = []  # (time.monotonic(), path) per request
        self.closing = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def hits(self) -> list[str]:
        """The path of every request, in arrival order."""
        return [path for _, path in self.hit_times]

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> HostileServer:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()
        self.shutdown()
        self.server_close()
        time.sleep(0)
