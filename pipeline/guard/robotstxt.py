"""robots.txt rules as RFC 9309 defines them.

urllib.robotparser predates the RFC: it takes the first matching rule instead of the longest,
ignores ``*`` and ``$`` in paths, and matches user-agents by substring. Sites write their
robots.txt for Google's reading, which is the RFC's, so this small matcher follows it:

* the group(s) naming our product token (case-insensitive, exact) apply, else those for
  ``*``, else nothing is disallowed; several groups for the same agent are merged;
* the longest matching rule wins, ``Allow`` wins a tie; ``*`` matches any run of characters,
  a trailing ``$`` anchors the end; an empty ``Disallow:`` is no rule;
* ``/robots.txt`` itself is always allowed; only the first 500 KiB are read;
* ``Crawl-delay`` (not in the RFC, honoured by Bing, Yandex and most polite crawlers) is read
  from the same groups: :meth:`RobotsRules.crawl_delay`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

MAX_BYTES = 500 * 1024
_SAFE = "/!$&'()*+,;=:@?~-._"


def _norm(path: str) -> str:
    # Compare paths in one percent-encoding: "/a%7Eb" and "/a~b" are the same resource.
    return quote(unquote(path, errors="replace"), safe=_SAFE)


@dataclass(frozen=True)
class Rule:
    allow: bool
    pattern: str
    regex: re.Pattern[str]

    @classmethod
    def make(cls, allow: bool, pattern: str) -> Rule:
        p = _norm(pattern)
        anchored = p.endswith("$")
        body = p[:-1] if anchored else p
        rx = ".*".join(re.escape(part) for part in body.split("*"))
        return cls(allow, pattern, re.compile(rx + (r"\Z" if anchored else ""), re.DOTALL))

    def __str__(self) -> str:
        return f"{'Allow' if self.allow else 'Disallow'}: {self.pattern}"


class RobotsRules:
    """Parsed robots.txt; :meth:`verdict` answers for one path and one product token."""

    def __init__(self, text: str) -> None:
        self.groups: list[tuple[list[str], list[Rule]]] = []
        # Crawl-delay is not in RFC 9309, but Bing, Yandex and most polite crawlers read it:
        # seconds between two requests, per group (index into groups).
        self.delays: dict[int, float] = {}
        agents: list[str] = []
        rules: list[Rule] = []
        in_rules = False
        for raw in text[:MAX_BYTES].splitlines():
            line = raw.split("#", 1)[0].strip()
            key, sep, value = line.partition(":")
            if not sep:
                continue
            key, value = key.strip().lower(), value.strip()
            if key == "user-agent":
                if in_rules:  # a user-agent line after rules starts a new group
                    self.groups.append((agents, rules))
                    agents, rules, in_rules = [], [], False
                agents.append(value.lower())
            elif key in ("allow", "disallow"):
                if not agents:
                    continue  # rules before any user-agent line belong to no group
                in_rules = True
                if value:
                    rules.append(Rule.make(key == "allow", value))
            elif key == "crawl-delay" and agents:
                in_rules = True
                delay = _seconds(value)
                if delay is not None:
                    n = len(self.groups)  # the index this group gets when it is closed
                    self.delays[n] = max(self.delays.get(n, 0.0), delay)
        if agents:
            self.groups.append((agents, rules))

    def rules_for(self, token: str) -> list[Rule]:
        token = token.strip().lower()
        mine = [r for agents, rules in self.groups if token in agents for r in rules]
        if mine or any(token in agents for agents, _ in self.groups):
            return mine
        return [r for agents, rules in self.groups if "*" in agents for r in rules]

    def crawl_delay(self, token: str) -> float | None:
        """Seconds between requests asked of ``token`` (the groups :meth:`rules_for` uses;
        the largest when several say), or None."""
        token = token.strip().lower()
        mine = [i for i, (agents, _) in enumerate(self.groups) if token in agents]
        groups = mine or [i for i, (agents, _) in enumerate(self.groups) if "*" in agents]
        delays = [self.delays[i] for i in groups if i in self.delays]
        return max(delays) if delays else None

    def verdict(self, path: str, token: str) -> tuple[bool, Rule | None]:
        """(allowed, the deciding rule or None) for a path (with its query)."""
        target = _norm(path or "/")
        if target == "/robots.txt":
            return True, None
        best: Rule | None = None
        for rule in self.rules_for(token):
            if rule.regex.match(target):
                if (best is None or len(rule.pattern) > len(best.pattern)
                        or (len(rule.pattern) == len(best.pattern) and rule.allow)):
                    best = rule
        return (True if best is None else best.allow), best


def _seconds(value: str) -> float | None:
    try:
        v = float(value)
    except ValueError:
        return None
    return v if 0 <= v < float("inf") else None


def path_of(url: str) -> str:
    """The path and query of a URL, as robots.txt rules see them."""
    p = urlsplit(url)
    return (p.path or "/") + (f"?{p.query}" if p.query else "")


def origin_of(url: str) -> str | None:
    """``scheme://host[:port]`` whose /robots.txt governs ``url`` (None if not http(s))."""
    try:
        p = urlsplit(url)
        port = p.port
    except ValueError:
        return None
    scheme = p.scheme.lower()
    if scheme not in ("http", "https") or not p.hostname:
        return None
    host = p.hostname.lower()
    host = f"[{host}]" if ":" in host else host
    default = 443 if scheme == "https" else 80
    return f"{scheme}://{host}" + (f":{port}" if port and port != default else "")
