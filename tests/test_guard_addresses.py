"""Address parsing and classification: every spelling of an internal address is caught."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.guard.addresses import (
    allow_key,
    blocked_kind,
    host_port,
    normalize_host,
    parse_allow_hosts,
    parse_ip_literal,
)

LOOPBACK = ipaddress.ip_address("127.0.0.1")


@pytest.mark.parametrize("spelling", [
    "127.0.0.1", "2130706433", "0x7f000001", "0X7F000001", "0177.0.0.1", "0177.0.0.01",
    "127.1", "127.0.1", "0x7f.1", "017700000001", "127.0.0.1.", "[127.0.0.1]",
])
def test_ipv4_spellings_of_loopback_parse_to_127_0_0_1(spelling: str) -> None:
    assert parse_ip_literal(spelling) == LOOPBACK
    assert blocked_kind(spelling) == "loopback"


@pytest.mark.parametrize("spelling,kind", [
    ("[::ffff:127.0.0.1]", "loopback"), ("::ffff:7f00:1", "loopback"), ("[::1]", "loopback"),
    ("2002:7f00:1::", "loopback"),  # 6to4 wrapping 127.0.0.1
    ("64:ff9b::a00:1", "private"),  # NAT64 wrapping 10.0.0.1
    ("fe80::1%eth0", "link_local"), ("fc00::1", "private"), ("fec0::1", "private"),
    ("ff02::1", "multicast"), ("::", "unspecified"), ("::127.0.0.1", "reserved"),
])
def test_ipv6_forms_are_classified_through_what_they_embed(spelling: str, kind: str) -> None:
    assert blocked_kind(spelling).startswith(kind)


@pytest.mark.parametrize("addr,kind", [
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "link_local"),  # cloud metadata service
    ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"), ("240.0.0.1", "reserved"),
    ("100.64.0.1", "shared"), ("255.255.255.255", "reserved"), ("0.1.2.3", "private"),
    ("0x", "unspecified"),  # "0x" is 0 to inet_aton and to browsers
    ("192.0.2.1", "private"),  # documentation range, never routed
])
def test_internal_ipv4_ranges_are_blocked(addr: str, kind: str) -> None:
    assert blocked_kind(addr) == kind


@pytest.mark.parametrize("addr", ["8.8.8.8", "93.184.216.34", "2606:4700::1111",
                                  "[::ffff:8.8.8.8]"])
def test_public_addresses_pass(addr: str) -> None:
    assert blocked_kind(addr) == ""


@pytest.mark.parametrize("name", ["example.com", "localhost", "256.1.1.1", "1.2.3.4.5",
                                  "08.0.0.1", "１２７.0.0.1", ""])
def test_names_and_invalid_numbers_are_not_literals(name: str) -> None:
    # Not literals: the proxy resolves them and checks the address it connects to.
    assert parse_ip_literal(name) is None


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_every_numeric_spelling_names_the_same_address(value: int) -> None:
    ip = ipaddress.IPv4Address(value)
    octets = str(ip).split(".")
    spellings = [str(value), hex(value), "0" + oct(value)[2:] if value else "0",
                 ".".join(f"0x{int(o):x}" for o in octets),
                 ".".join(f"0{int(o):o}" for o in octets), str(ip) + "."]
    for s in spellings:
        assert parse_ip_literal(s) == ip, s


def test_allowlist_matches_exactly_the_spelling_written() -> None:
    allow = parse_allow_hosts(["127.0.0.1:8080", "[::1]:9000", "Demo.Local:80"])
    assert (allow_key("127.0.0.1"), 8080) in allow
    assert (allow_key("[::1]"), 9000) in allow
    assert (allow_key("demo.local"), 80) in allow
    for host in ("127.0.0.1.", "0x7f000001", "2130706433", "localhost"):
        assert (allow_key(host), 8080) not in allow
    with pytest.raises(ValueError, match="host:port"):
        parse_allow_hosts(["127.0.0.1"])


def test_host_port_and_normalize() -> None:
    assert host_port("http://Example.COM./a") == ("example.com", 80)
    assert host_port("https://[::1]:8443/") == ("::1", 8443)
    assert normalize_host("[FE80::1%eth0]") == "fe80::1"
    for bad in ("file:///etc/passwd", "ftp://x/y", "http:///nohost"):
        with pytest.raises(ValueError):
            host_port(bad)


@pytest.mark.parametrize("yaml_crawl,key", [
    ("{request_deadline: 0}", "crawl.request_deadline"),
    ("{max_body_bytes: -1}", "crawl.max_body_bytes"),
    ("{per_domain_concurrency: 0}", "crawl.per_domain_concurrency"),
    ("{per_domain_rps: -1}", "crawl.per_domain_rps"),
    ("{allow_hosts: ['127.0.0.1']}", "crawl.allow_hosts[0]"),
])
def test_guard_settings_are_validated(tmp_path, yaml_crawl: str, key: str) -> None:
    from pipeline.config import ConfigError, load_build

    y = tmp_path / "b.yaml"
    y.write_text(f"name: t\nsources: [{{path: m.jsonl}}]\ncrawl: {yaml_crawl}\n")
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_build(y)
