"""The demo web: a real threaded HTTP server on 127.0.0.1 serving the pool's web split, with
the faults of the real web injected at the network.

URL space (<id> may carry its extension, e.g. /f/slow/oc-1234.png):
  /img/<id>.<ext>       the image (image/png or image/jpeg)
  /f/404/<id>           404 Not Found            /f/500/<id>   500 Internal Server Error
  /f/slow/<id>          the image after `slow_seconds` (longer than a crawl timeout)
  /f/reset/<id>         headers and half the body, then a TCP reset (SO_LINGER 0)
  /f/truncated/<id>.jpg the image as JPEG cut in half (Content-Length of the cut body)
  /f/html/<id>          an HTML page (200, text/html) instead of an image
  /f/noai/<id>          the image with `X-Robots-Tag: noai`
  /r/<id>               302 to /img/<id>.<ext>
  /loop/a/<id> <-> /loop/b/<id>   a redirect loop
  /alias/<n>/<id>       the same image under another URL (exact-byte aliases)
  /p/<n>/<id>           the same image under another URL (a popular category's repost)
  /img/dv-<hash>.jpg    a near-duplicate copy of a pool image (derived.parquet, noise.py)
  /media/<id>           a placeholder image ("image not found", "no photo", a tiny flag)
                        instead of the image: one of three, by a hash of <id>
  /robots.txt           User-agent: * / Disallow: /private/
  /private/<id>         the image (only robots.txt forbids it)
Held-out images (split='heldout') are never served: 404 like unknown ids.
"""

from __future__ import annotations

import argparse
import io
import socket
import struct
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.demoweb import noise

CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg"}
ROBOTS_TXT = b"User-agent: *\nDisallow: /private/\n"
DEFAULT_SLOW_SECONDS = 8.0


class _Pool:
    """The servable images: id -> path (pool images of the web split, and the near-duplicate
    copies in derived.parquet); bytes are read per request (small files)."""

    def __init__(self, pool_dir: Path):
        self.pool_dir = pool_dir
        table = pq.read_table(pool_dir / "pool.parquet", columns=["image_id", "file", "split"])
        self.files: dict[str, Path] = {}
        for image_id, file, split in zip(*(table.column(c).to_pylist()
                                           for c in ("image_id", "file", "split")), strict=True):
            if split == "web":
                self.files[image_id] = pool_dir / file
        if not self.files:
            raise ValueError(f"{pool_dir / 'pool.parquet'}: no images with split='web'")
        self.web_ids = set(self.files)
        self.placeholders = noise.placeholder_images()
        self._jpeg_cache: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._derived_stamp: tuple[int, int] | None = None
        self._load_derived()

    def _load_derived(self) -> None:
        """(Re)read derived.parquet if it changed: manifests written while the web runs add
        copies to it."""
        path = self.pool_dir / "derived.parquet"
        try:
            st = path.stat()
        except FileNotFoundError:
            return
        if (st.st_mtime_ns, st.st_size) == self._derived_stamp:
            return
        table = pq.read_table(path, columns=["image_id", "file", "transform"])
        for image_id, file, transform in zip(*(table.column(c).to_pylist() for c in (
                "image_id", "file", "transform")), strict=True):
            if transform != "placeholder":  # placeholders are served only under /media/
                self.files[image_id] = self.pool_dir / file
        self._derived_stamp = (st.st_mtime_ns, st.st_size)

    def lookup(self, ref: str) -> tuple[str, Path] | None:
        image_id = ref.rsplit(".", 1)[0] if ref.rsplit(".", 1)[-1] in CONTENT_TYPES else ref
        path = self.files.get(image_id)
        if path is None and image_id.startswith("dv-"):
            with self._lock:
                self._load_derived()
            path = self.files.get(image_id)
        return None if path is None else (image_id, path)

    def as_jpeg(self, image_id: str) -> bytes:
        with self._lock:
            if image_id not in self._jpeg_cache:
                path = self.files[image_id]
                if path.suffix == ".jpg":
                    data = path.read_bytes()
                else:
                    from PIL import Image

                    buf = io.BytesIO()
                    with Image.open(path) as im:
                        im.convert("RGB").save(buf, "JPEG", quality=90)
                    data = buf.getvalue()
                self._jpeg_cache[image_id] = data
            return self._jpeg_cache[image_id]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "witforge-demoweb/1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass  # the crawl makes thousands of requests; count them instead (DemoWeb.hits)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _send(self, code: int, body: bytes, ctype: str, head: bool = False,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _not_found(self, head: bool) -> None:
        self._send(404, b"<html><body><h1>404 Not Found</h1></body></html>",
                   "text/html; charset=utf-8", head)

    def _image(self, path: Path, head: bool, headers: dict[str, str] | None = None) -> None:
        ext = path.suffix.lstrip(".")
        self._send(200, path.read_bytes(), CONTENT_TYPES[ext], head, headers)

    def _route(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        self.server.count(path)
        parts = [p for p in path.split("/") if p]
        if path == "/robots.txt":
            return self._send(200, ROBOTS_TXT, "text/plain; charset=utf-8", head)
        if not parts:
            return self._send(200, b"<html><body>witforge demo web</body></html>",
                              "text/html; charset=utf-8", head)
        found = self.server.pool.lookup(parts[-1])
        if found is None:
            return self._not_found(head)
        image_id, file = found
        kind = parts[:-1]
        if kind in (["img"], ["private"]) or (len(kind) == 2 and kind[0] in ("alias", "p")):
            return self._image(file, head)
        if kind == ["media"] and image_id in self.server.pool.web_ids:
            # the lost picture's placeholder: the same bytes for every image that maps to it
            body = self.server.pool.placeholders[noise.placeholder_of(image_id)]
            return self._send(200, body, "image/png", head)
        if kind == ["r"]:
            return self._redirect(f"/img/{file.name}")
        if kind in (["loop", "a"], ["loop", "b"]):
            other = "b" if kind[1] == "a" else "a"
            return self._redirect(f"/loop/{other}/{image_id}")
        if len(kind) == 2 and kind[0] == "f":
            return self._fault(kind[1], image_id, file, head)
        return self._not_found(head)

    def _fault(self, fault: str, image_id: str, file: Path, head: bool) -> None:
        if fault == "404":
            return self._not_found(head)
        if fault == "500":
            return self._send(500, b"<html><body><h1>500 Internal Server Error</h1></body></html>",
                              "text/html; charset=utf-8", head)
        if fault == "slow":
            # Wait in slices so that DemoWeb.__exit__ is never held up by a sleeping handler.
            if self.server.stopping.wait(self.server.slow_seconds):
                self.close_connection = True
                return None
            return self._image(file, head)
        if fault == "reset":
            return self._reset(file.read_bytes(), CONTENT_TYPES[file.suffix.lstrip(".")])
        if fault == "truncated":
            data = self.server.pool.as_jpeg(image_id)
            return self._send(200, data[: len(data) // 2], "image/jpeg", head)
        if fault == "html":
            page = (f"<!doctype html><html><head><title>{image_id}</title></head><body>"
                    f"<p>Image page</p><img src=\"/img/{file.name}\" alt=\"\"></body></html>")
            return self._send(200, page.encode(), "text/html; charset=utf-8", head)
        if fault == "noai":
            return self._image(file, head, {"X-Robots-Tag": "noai"})
        return self._not_found(head)

    def _reset(self, body: bytes, ctype: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        # SO_LINGER 0 turns close() into a RST. The makefile() objects hold references to the
        # socket, so they must be closed first or close() would not really close it.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.rfile.close()
        self.wfile.close()
        self.connection.close()
        # handle_one_request() flushes wfile after us; give it something harmless to flush.
        self.rfile, self.wfile = io.BytesIO(), io.BytesIO()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    # A crawl opens dozens of connections at once; the default backlog of 5 made a loaded
    # machine drop connection attempts before they reached the server.
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], pool: _Pool, slow_seconds: float):
        self.pool = pool
        self.slow_seconds = slow_seconds
        self.stopping = threading.Event()
        self.hits: Counter[str] = Counter()
        self._hits_lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        super().__init__(addr, _Handler)

    def handle_error(self, request, client_address):  # type: ignore[no-untyped-def]
        # Clients that time out or hang up (the crawler on /f/slow/) are the normal case here.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def count(self, path: str) -> None:
        with self._hits_lock:
            self.hits[path] += 1

    def process_request(self, request, client_address):  # type: ignore[no-untyped-def]
        with self._hits_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):  # type: ignore[no-untyped-def]
        with self._hits_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        """Kick idle keep-alive connections so their handler threads end now."""
        with self._hits_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its handler


class DemoWeb:
    """`with DemoWeb(pool_dir) as web: ... web.base_url ...` — serves until the block ends."""

    def __init__(self, pool_dir: Path, host: str = "127.0.0.1", port: int = 0,
                 slow_seconds: float = DEFAULT_SLOW_SECONDS):
        if not host.startswith("127."):
            raise ValueError(f"DemoWeb host {host!r}: the demo web only listens on loopback")
        self.pool_dir = Path(pool_dir)
        self.host = host
        self.port = port
        self.slow_seconds = slow_seconds
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def host_port(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def hits(self) -> Counter[str]:
        """Requests per path so far (copy)."""
        if self._server is None:
            return Counter()
        with self._server._hits_lock:
            return Counter(self._server.hits)

    def start(self) -> DemoWeb:
        pool = _Pool(self.pool_dir)
        self._server = _Server((self.host, self.port), pool, self.slow_seconds)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name=f"demoweb:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._server.close_all_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> DemoWeb:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="witforge demo-web",
        description="Serve the demo pool's web split on 127.0.0.1 with injected faults "
        "(/img, /f/404, /f/500, /f/slow, /f/reset, /f/truncated, /f/html, /f/noai, /r, /loop, "
        "/alias, /p, /media, /private, /robots.txt) until Ctrl-C.")
    p.add_argument("--pool", type=Path, default=Path("demo_data/pool"),
                   help="pool folder from `witforge demo-data` (default %(default)s)")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.add_argument("--slow-seconds", type=float, default=DEFAULT_SLOW_SECONDS,
                   help="delay of /f/slow/ responses (default %(default)s)")
    args = p.parse_args(argv)
    if not (args.pool / "pool.parquet").is_file():
        from pipeline.config import ConfigError

        raise ConfigError(f"{args.pool / 'pool.parquet'} not found: run `witforge demo-data` "
                          "first (or pass --pool)")
    with DemoWeb(args.pool, port=args.port, slow_seconds=args.slow_seconds) as web:
        pool = web._server.pool
        print(f"demo web serving {len(pool.web_ids)} images (+{len(pool.files) - len(pool.web_ids)}"
              f" near-duplicate copies) at {web.base_url} "
              "(Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("demo web stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
