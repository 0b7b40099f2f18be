"""Which addresses a crawler may connect to, whatever way the manifest spells them.

The guard never trusts the text of a URL: the proxy resolves the host itself and checks the
address it actually connects to. This module supplies the two halves of that check:

* :func:`parse_ip_literal` reads a host the way browsers and ``inet_aton`` do, so that
  ``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1``, ``127.0.0.1.`` and
  ``[::ffff:127.0.0.1]`` are all recognised as 127.0.0.1 *before* any DNS lookup (a resolver
  may treat ``127.0.0.1.`` as a name and hand back anything).
* :func:`blocked_kind` says why an address must not be reached (loopback, private, link-local,
  multicast, reserved, unspecified, not globally routable), looking through IPv6 forms that
  embed an IPv4 address (mapped, 6to4, Teredo, NAT64).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPAT = ipaddress.ip_network("::/96")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def normalize_host(host: str) -> str:
    """Lowercase, without IPv6 brackets, zone id or trailing dots: the key for allowlists and
    per-domain limits (``Example.COM.`` and ``example.com`` are one site)."""
    h = host.strip().lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    h = h.split("%", 1)[0] if ":" in h else h  # IPv6 zone id (fe80::1%eth0)
    return h.rstrip(".") if h not in (".", "") else h


def _ipv4_part(text: str) -> int | None:
    # inet_aton / WHATWG number rules: 0x.. hex, a leading 0 octal, otherwise decimal.
    if not text:
        return None
    try:
        if text[:2] in ("0x", "0X"):
            return int(text[2:], 16) if text[2:] else 0
        if len(text) > 1 and text[0] == "0":
            return int(text[1:], 8)
        if not text.isascii() or not text.isdigit():
            return None
        return int(text, 10)
    except ValueError:
        return None


def _parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    nums = [_ipv4_part(p) for p in parts]
    if any(n is None for n in nums):
        return None
    *head, last = nums
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        return None
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a host names if it is an IP literal in any spelling, else None (a name)."""
    h = normalize_host(host)
    if not h:
        return None
    if ":" in h:
        try:
            return ipaddress.IPv6Address(h)
        except ValueError:
            return None
    return _parse_ipv4(h)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries inside (mapped, 6to4, Teredo, NAT64)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def blocked_kind(ip: IPAddress | str) -> str:
    """Why a crawler must not connect to ``ip`` ('' when it is a public unicast address)."""
    if isinstance(ip, str):
        parsed = parse_ip_literal(ip)
        if parsed is None:
            raise ValueError(f"not an IP address: {ip!r}")
        ip = parsed
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            kind = blocked_kind(inner)
            return f"{kind} (embedded in {ip})" if kind else ""
        if ip.is_unspecified or ip.is_loopback:
            return "unspecified" if ip.is_unspecified else "loopback"
        if ip in _NAT64_LOCAL or (ip in _IPV4_COMPAT):
            return "reserved"
        if ip.is_site_local:
            return "private"
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link_local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("shared", isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT),
        ("not_global", not ip.is_global),
    )
    for kind, hit in checks:
        if hit:
            return kind
    return ""


def host_port(url: str) -> tuple[str, int]:
    """(normalized host, port) of an http(s) URL; ValueError for other schemes or no host."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"scheme {scheme or '(none)'!r} is not http or https: {url}")
    if not parts.hostname:
        raise ValueError(f"no host in {url}")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"bad port in {url}: {e}") from None
    return normalize_host(parts.hostname), port or (443 if scheme == "https" else 80)


def allow_key(host: str) -> str:
    """The allowlist's view of a host: lowercased, brackets off, nothing else forgiven.

    Stricter than :func:`normalize_host` on purpose: allowing ``127.0.0.1:8080`` lets through
    exactly that spelling, not ``127.0.0.1.``, ``0x7f000001`` or ``localhost``."""
    h = host.strip().lower()
    return h[1:-1] if h.startswith("[") and h.endswith("]") else h


def parse_allow_hosts(entries: list[str]) -> frozenset[tuple[str, int]]:
    """``host:port`` allowlist entries (``[::1]:8080`` for IPv6) as (allow_key, port) pairs."""
    out = set()
    for e in entries:
        host, sep, port = e.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"crawl.allow_hosts entry {e!r} is not host:port")
        out.add((allow_key(host), int(port)))
    return frozenset(out)
