"""`witforge search --build B`: a local search page and clip-retrieval's JSON API over a build.

Routes (all answered from memory and from files of the build, nothing from the network):

    GET  /                          the search page (pages/search.html)
    POST /knn-service               clip-retrieval's knn request -> [{id, similarity, ...}]
    GET|POST /indices-list          the index names (one per --build: the build's name)
    POST /metadata                  {ids, indice_name} -> [{id, metadata}]
    GET  /api/info                  per index: rows, kept/dropped counts, reasons, sources
    GET  /thumb/<index>/<uid>       a JPEG of the row's image, read from the crawl's tar
    GET  /build/<index>/<path>      a file of the build folder (e.g. card/index.html)
    GET  /health                    ok

Bound to 127.0.0.1 unless --host says otherwise. A path that leaves the build (``..``,
absolute, percent-encoded dots, a symlink pointing out) is refused with 403; on a loopback
address a Host header that is not a loopback name is refused too (DNS rebinding).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import json
import mimetypes
import re
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pages import search_api
from pages.search_api import Indices
from pages.search_index import QueryError, SearchIndex, inside

PAGE = Path(__file__).parent / "search.html"
MAX_BODY = 32 << 20  # a base64 image of ~24 MB
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


def _csp(page: str) -> str:
    """Only the page's own inline script and style run: a caption that slipped past the
    escaping still could not run a handler (defence in depth; the page escapes first)."""
    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        return " ".join("'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest())
                        .decode() + "'" for b in blocks)
    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'")


class SearchServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, indices: Indices, host: str = "127.0.0.1", port: int = 1234,
                 allow_origin: str | None = None) -> None:
        self.indices, self.allow_origin = indices, allow_origin
        self.page = PAGE.read_text(encoding="utf-8")
        self.csp = _csp(self.page)
        try:
            self.loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            self.loopback = host == "localhost"
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class Handler(BaseHTTPRequestHandler):
    server: SearchServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
        pass  # one line per thumbnail would bury the startup message

    # -- plumbing -----------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None
              ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        if self.server.allow_origin:
            self.send_header("Access-Control-Allow-Origin", self.server.allow_origin)
            self.send_header("Access-Control-Allow-Headers", "Content-Type")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200) -> None:
        self._send(status, json.dumps(data, ensure_ascii=False).encode("utf-8"),
                   "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json({"message": message}, status)  # flask-restful's error shape, as clip_back

    def _target(self) -> tuple[str, dict[str, list[str]]]:
        parts = urllib.parse.urlsplit(self.path)
        return parts.path, urllib.parse.parse_qs(parts.query)

    def _host_ok(self) -> bool:
        if not self.server.loopback:
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name in _LOOPBACK_NAMES

    def _body(self) -> Any:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise QueryError("Content-Length is not a number") from None
        if n > MAX_BODY:
            raise QueryError(f"the request body is larger than {MAX_BODY >> 20} MB")
        raw = self.rfile.read(n) if n else b""
        if not raw:
            return {}
        try:  # clip-retrieval's client sends JSON without a Content-Type, as flask's force=True
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise QueryError(f"the request body is not JSON: {e}") from None

    def _guarded(self, fn: Any, *args: Any) -> None:
        if not self._host_ok():
            self._error(403, "Host header is not a loopback name (this server answers "
                             "127.0.0.1/localhost only)")
            return
        try:
            fn(*args)
        except QueryError as e:
            self._error(400, str(e))
        except PermissionError:
            self._error(403, "outside the build")
        except (BrokenPipeError, ConnectionResetError):
            pass

    # -- verbs --------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_HEAD(self) -> None:
        self._guarded(self._get)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def do_OPTIONS(self) -> None:  # a CORS preflight, when --allow-origin is set
        self._send(204, b"", "text/plain", {"Access-Control-Allow-Methods": "GET, POST"})

    def _post(self) -> None:
        path, _ = self._target()
        body = self._body()
        if path == "/knn-service":
            self._json(search_api.knn(self.server.indices, body))
        elif path == "/metadata":
            self._json(search_api.metadata(self.server.indices, body))
        elif path == "/indices-list":
            self._json(self.server.indices.names())
        else:
            self._error(404, f"no such endpoint: POST {path}")

    def _get(self) -> None:
        path, query = self._target()
        ix = self.server.indices
        if path in ("/", "/index.html"):
            self._send(200, self.server.page.encode("utf-8"), "text/html; charset=utf-8",
                       {"Content-Security-Policy": self.server.csp,
                        "Referrer-Policy": "no-referrer"})
        elif path == "/indices-list":
            self._json(ix.names())
        elif path == "/health":
            self._send(200, b"ok", "text/plain")
        elif path == "/api/info":
            names = query.get("indice_name") or ix.names()
            self._json({"indices": [ix.get(n).info() for n in names]})
        elif path.startswith("/thumb/"):
            self._thumb(path.removeprefix("/thumb/"))
        elif path.startswith("/build/"):
            self._build_file(path.removeprefix("/build/"))
        else:
            self._error(404, f"no such page: {path}")

    def _thumb(self, rest: str) -> None:
        parts = [urllib.parse.unquote(p) for p in rest.split("/")]
        if len(parts) != 2 or parts[0] not in self.server.indices.by_name:
            self._error(404, "thumbnails are /thumb/<index>/<uid>")
            return
        index = self.server.indices.by_name[parts[0]]
        try:
            jpeg = index.thumbnail(parts[1])  # a uid is looked up, never used as a path
        except KeyError:
            self._error(404, f"no image for uid {parts[1]!r} in {parts[0]}")
            return
        except PermissionError:
            self._error(403, f"the image of {parts[1]} lies outside the build")
            return
        except (OSError, ValueError) as e:
            self._error(404, f"the image of {parts[1]} cannot be read: {e}")
            return
        self._send(200, jpeg, "image/jpeg", {"Cache-Control": "max-age=3600"})

    def _build_file(self, rest: str) -> None:
        name, _, raw = rest.partition("/")
        index = self.server.indices.by_name.get(urllib.parse.unquote(name))
        if index is None:
            self._error(404, "build files are /build/<index>/<path inside the build>")
            return
        rel = urllib.parse.unquote(raw)
        segments = rel.replace("\\", "/").split("/")
        if (not rel or rel.startswith("/") or "\0" in rel
                or any(s in ("..", ".", "") for s in segments)):
            raise PermissionError(rel)  # refused before the file system is asked
        path = inside(index.run_dir, rel)  # symlinks resolved: a link out is refused too
        if not path.is_file():
            self._error(404, f"no such file in build {index.name}: {rel}")
            return
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self._send(200, path.read_bytes(), ctype)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="witforge search",
        description="Serve a search page and clip-retrieval's JSON API (/knn-service, "
        "/indices-list) over a build's embed stage: text or image queries, the nearest pairs "
        "with the ledger's verdict (kept, or dropped by which stage and why).")
    p.add_argument("--build", action="append", required=True, metavar="BUILD",
                   help="the build YAML (its embed stage must have run); repeat to serve "
                   "several builds, one index each, named by the build")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=1234,
                   help="port (default 1234, as clip-retrieval's back end; 0 = any free port)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="where queries are encoded (default cpu)")
    p.add_argument("--columns", default=",".join(search_api.DEFAULT_COLUMNS),
                   help="metadata columns /knn-service returns, comma-separated (default: "
                   "all; leave out 'image' to send no base64 images)")
    p.add_argument("--threads", type=int, default=1,
                   help="faiss threads per search (default 1: a single query answered faster "
                   "on one thread in every measurement here, and concurrent requests use the "
                   "other cores; 0 = faiss's default, every core)")
    p.add_argument("--allow-origin", metavar="ORIGIN",
                   help="send Access-Control-Allow-Origin: ORIGIN (e.g. for clip-retrieval's "
                   "front end served elsewhere); default none")
    return p


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_build

    args = _parser().parse_args(argv)
    columns = tuple(c.strip() for c in args.columns.split(",") if c.strip())
    try:
        search_api.check_columns(columns)
    except QueryError as e:
        print(f"witforge search: error: --columns: {e}", file=sys.stderr)
        return 2
    if args.threads > 0:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    indices = []
    for build in args.build:
        cfg = load_build(build)
        ix = SearchIndex.open(cfg, device=args.device)
        indices.append(ix)
        print(f"index {ix.name}: {len(ix.uids):,} rows of {ix.stages[0]} "
              f"({ix.manifest.get('architecture')}, {ix.dim}-d), ledger through {ix.stages[-1]}",
              flush=True)
    try:
        server = SearchServer(Indices(indices, columns), args.host, args.port, args.allow_origin)
    except ValueError as e:
        print(f"witforge search: error: {e}", file=sys.stderr)
        return 2
    print(f"search page: {server.url}   API: {server.url}knn-service, {server.url}indices-list"
          "   (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
