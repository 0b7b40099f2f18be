"""HTTP/1.1 on the wire for the guarding proxy: request/response heads, bodies with a cap."""

from __future__ import annotations

import asyncio
from typing import Any

TAG = "witforge-guard"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization",
              "proxy-authenticate", "te", "trailer", "transfer-encoding", "upgrade"}
CHUNK = 64 * 1024


class Refused(Exception):
    """A request the guard ends itself: carries the status, the reason token and a detail."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.status, self.reason, self.detail = status, reason, detail


def phrase(text: str, limit: int = 1500) -> str:
    # A reason phrase is one line of visible ASCII; URLs keep their meaning percent-encoded.
    out = "".join(c if 32 <= ord(c) < 127 else f"%{ord(c) & 0xFF:02X}" for c in text)
    return out[:limit]


def parse_head(data: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = data.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise Refused(400, "bad_request", "malformed header line")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers


def get_header(headers: list[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _too_large(cap: int, what: str) -> Refused:
    return Refused(502, "body_too_large", f"{what} > max_body_bytes={cap}")


async def read_body(r: asyncio.StreamReader, method: str, status: int,
                    headers: list[tuple[str, str]], spool: Any, cap: int) -> int:
    """Read a response body into ``spool`` (chunked, Content-Length or until close),
    counting bytes: Refused(body_too_large) as soon as it would pass ``cap``."""
    if method == "HEAD" or status in (204, 304) or status < 200:
        return 0
    size = 0
    te = (get_header(headers, "transfer-encoding") or "").lower()
    if "chunked" in te:
        while True:
            line = await r.readuntil(b"\r\n")
            try:
                n = int(line.split(b";", 1)[0].strip() or b"x", 16)
            except ValueError:
                raise Refused(502, "bad_response", "bad chunk size") from None
            if n == 0:
                break
            if size + n > cap:
                raise _too_large(cap, f"chunked body reached {size + n} bytes")
            spool.write(await r.readexactly(n))
            size += n
            await r.readexactly(2)
        return size
    length = get_header(headers, "content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise Refused(502, "bad_response", f"bad Content-Length {length!r}")
        n = int(length)
        if n > cap:
            raise _too_large(cap, f"Content-Length {n}")
        while size < n:
            data = await r.read(min(CHUNK, n - size))
            if not data:
                raise Refused(502, "bad_response", f"body ended at {size} of {n} bytes")
            spool.write(data)
            size += len(data)
        return size
    while data := await r.read(CHUNK):  # no length: the body ends when the server closes
        size += len(data)
        if size > cap:
            raise _too_large(cap, f"body reached {size} bytes")
        spool.write(data)
    return size


def parts_host(host: str, port: int, tls: bool) -> str:
    """The Host header value for a host and port (brackets for IPv6, default port omitted)."""
    h = f"[{host}]" if ":" in host else host
    return h if port == (443 if tls else 80) else f"{h}:{port}"
