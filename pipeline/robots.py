"""Robots: fetch each site's robots.txt once and drop the URLs it disallows for our crawler.

Runs before the crawl. Every origin (``scheme://host[:port]``) in the input gets one fetch of
``/robots.txt``, through the same guarding proxy the crawl uses (address guard, deadline,
body cap, per-domain limits), from a thread pool. Answers are cached in the stage's work
folder (``runs/<build>/05_robots.work/robots.jsonl``), so a rerun, a changed filter upstream or
an interrupted stage never asks a site twice within a build.

What an answer means (RFC 9309):

* 2xx: the rules apply to ``crawl.user_agent_token`` (see pipeline/guard/robotstxt.py);
* 4xx other than 429 (no robots.txt): everything is allowed;
* 5xx, 429, a timeout or a network error: "unreachable", which the RFC says to treat as a
  complete disallow — every URL of that origin is dropped;
* the guard refused the address: the URLs are dropped as ``blocked_address`` here, since
  the crawl would refuse them anyway.

Drops have reason ``robots_disallowed`` (detail: the URL and the deciding rule),
``robots_unreachable`` (detail: why robots.txt could not be read — kept apart so that dead
sites do not pass for sites that said no) or ``blocked_address`` (detail: the URL). All other
rows are kept with every input column.

Sites that ask for a ``Crawl-delay`` (for our token, else for ``*``) are listed in the stage's
``crawl_delays.json`` (host -> seconds); the crawl's guard then spaces its requests to that
host at least that far apart, up to ``crawl.max_crawl_delay``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import BuildConfig
from pipeline.guard.addresses import normalize_host
from pipeline.guard.proxy import (
    GuardProxy,
    classify_guard_error,
    client_timeout,
    settings_from_crawl,
)
from pipeline.guard.robotstxt import MAX_BYTES, RobotsRules, origin_of, path_of
from pipeline.progress import progress
from pipeline.stage import StageContext, StageError, get_spec, stage_dir

SQL = Path(__file__).parent / "sql" / "robots_split.sql"
CACHE = "robots.jsonl"
DELAYS = "crawl_delays.json"  # host -> seconds, for the crawl's guard
_BATCH = 65536


def user_agent(token: str) -> str:
    # The same product token img2dataset sends with each image request.
    return f"Mozilla/5.0 (compatible; {token}; +https://github.com/rom1504/img2dataset)"


def fetch_robots(opener: Any, origin: str, timeout: float, token: str) -> dict[str, Any]:
    """One robots.txt fetch; never raises for network trouble (it is recorded instead)."""
    req = urllib.request.Request(origin + "/robots.txt",
                                 headers={"User-Agent": user_agent(token)})
    entry: dict[str, Any] = {"origin": origin, "fetched": round(time.time(), 3)}
    try:
        with opener.open(req, timeout=timeout) as r:
            entry["status"] = r.status
            entry["body"] = r.read(MAX_BYTES).decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        entry["status"] = e.code
        entry["error"] = str(e)
        e.close()
    except (urllib.error.URLError, OSError, ValueError) as e:
        entry["status"] = None
        entry["error"] = str(e)
    return entry


def _load_cache(path: Path) -> dict[str, dict[str, Any]]:
    cache: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line cut short by an interruption; fetched again
            cache[e["origin"]] = e
    return cache


def host_delays(origins: list[str], states: list[Any], token: str) -> dict[str, float]:
    """host -> the Crawl-delay its robots.txt asks of ``token`` (the largest over the host's
    origins: the guard spaces requests per host, whatever the scheme or port)."""
    out: dict[str, float] = {}
    for origin, state in zip(origins, states, strict=True):
        if isinstance(state, RobotsRules):
            delay = state.crawl_delay(token)
            host = urlsplit(origin).hostname
            if delay and host:
                key = normalize_host(host)
                out[key] = max(out.get(key, 0.0), delay)
    return out


def crawl_delays(cfg: BuildConfig) -> dict[str, float]:
    """The robots stage's Crawl-delays for the crawl's guard, capped at crawl.max_crawl_delay
    (empty when the robots stage is off, has not run, or the cap is 0)."""
    path = stage_dir(cfg, get_spec("robots")) / DELAYS
    if not cfg.crawl.robots or cfg.crawl.max_crawl_delay <= 0 or not path.exists():
        return {}
    cap = float(cfg.crawl.max_crawl_delay)
    return {h: min(float(d), cap) for h, d in json.loads(path.read_text()).items()}


class _Verdicts:
    """What an origin's cached answer says about one URL."""

    def __init__(self, cache: dict[str, dict[str, Any]], token: str) -> None:
        self.cache, self.token = cache, token
        self.rules: dict[str, RobotsRules | tuple[str, str] | None] = {}

    def _state(self, origin: str) -> RobotsRules | tuple[str, str] | None:
        if origin not in self.rules:
            e = self.cache[origin]
            status, err = e.get("status"), e.get("error", "")
            guard = classify_guard_error(err)
            if guard and guard[0] in ("blocked_address", "blocked_scheme"):
                state: RobotsRules | tuple[str, str] | None = ("blocked_address", guard[0])
            elif status is not None and 200 <= status < 300:
                state = RobotsRules(e.get("body", ""))
            elif status is not None and 400 <= status < 500 and status != 429:
                state = None  # no robots.txt: everything allowed
            else:
                why = f"HTTP {status}" if status else (err or "no answer")
                state = ("robots_unreachable", f"{origin}/robots.txt unreachable ({why}); "
                         "RFC 9309 treats that as a complete disallow")
            self.rules[origin] = state
        return self.rules[origin]

    def __call__(self, url: str) -> tuple[str, str] | None:
        origin = origin_of(url)
        if origin is None:
            return None  # not http(s): the crawl's guard refuses it with its own reason
        state = self._state(origin)
        if state is None:
            return None
        if isinstance(state, tuple):
            return (state[0], url) if state[0] == "blocked_address" else state
        ok, rule = state.verdict(path_of(url), self.token)
        if ok:
            return None
        return "robots_disallowed", f"{url}: '{rule}' in {origin}/robots.txt for {self.token}"


def _origins(input_path: Path) -> list[str]:
    seen: set[str] = set()
    for batch in pq.ParquetFile(input_path).iter_batches(_BATCH, columns=["url"]):
        for url in batch.column(0).to_pylist():
            o = origin_of(url or "")
            if o is not None:
                seen.add(o)
    return sorted(seen)


def _fetch_missing(ctx: StageContext, origins: list[str], cache_path: Path,
                   cache: dict[str, dict[str, Any]]) -> dict[str, Any]:
    crawl = ctx.cfg.crawl
    todo = [o for o in origins if o not in cache]
    if not todo:
        return {}
    # robots.txt is small by rule: a tighter body cap than images, same deadline and guard.
    settings = settings_from_crawl(crawl, max_body_bytes=min(crawl.max_body_bytes, 2 * MAX_BYTES),
                                   check_addresses=crawl.guard)
    workers = max(1, min(64, crawl.processes_count * crawl.thread_count, len(todo)))
    with GuardProxy(settings, events_path=ctx.work_dir / "guard.jsonl") as proxy, \
            open(cache_path, "a", encoding="utf-8") as out, \
            ThreadPoolExecutor(workers) as pool, \
            progress(total=len(todo), desc="robots.txt", unit="site",
                 mininterval=1.0, dynamic_ncols=True) as bar:
        opener = proxy.opener()
        timeout = client_timeout(settings)
        for entry in pool.map(lambda o: fetch_robots(opener, o, timeout,
                                                     crawl.user_agent_token), todo):
            cache[entry["origin"]] = entry
            out.write(json.dumps(entry) + "\n")
            out.flush()  # an interrupted stage keeps what it already asked
            bar.update(1)
    return proxy.stats()


def run(ctx: StageContext) -> dict[str, Any]:
    if ctx.input_path is None:
        raise StageError("robots needs an upstream stage (ingest at least)")
    token = ctx.cfg.crawl.user_agent_token
    if not token:
        raise StageError(f"{ctx.cfg.path}: crawl.user_agent_token is empty; robots.txt rules "
                         "are matched against it")
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    cache_path = ctx.work_dir / CACHE
    cache = _load_cache(cache_path)
    origins = _origins(ctx.input_path)
    cached_before = sum(1 for o in origins if o in cache)
    started = time.time()
    guard_stats = _fetch_missing(ctx, origins, cache_path, cache)
    fetch_seconds = time.time() - started

    verdict = _Verdicts(cache, token)
    drops = ctx.out_dir / "_robots_drops.parquet"
    schema = pa.schema([("uid", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
    with pq.ParquetWriter(drops, schema) as w:
        for batch in pq.ParquetFile(ctx.input_path).iter_batches(_BATCH, columns=["uid", "url"]):
            rows: dict[str, list[str]] = {"uid": [], "reason": [], "detail": []}
            for uid, url in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(),
                                strict=True):
                v = verdict(url or "")
                if v is not None:
                    rows["uid"].append(uid)
                    rows["reason"].append(v[0])
                    rows["detail"].append(v[1])
            w.write_table(pa.table(rows, schema=schema))
    con = ctx.connect()
    con.execute(SQL.read_text().format(input=ctx.input_path, drops=drops,
                                       kept=ctx.kept_path, dropped=ctx.dropped_path))
    drops.unlink()
    states = [verdict._state(o) for o in origins]
    delays = host_delays(origins, states, token)
    (ctx.out_dir / DELAYS).write_text(json.dumps(delays, indent=0, sort_keys=True))
    return {
        "hosts_with_crawl_delay": len(delays),
        "max_crawl_delay": max(delays.values(), default=0.0),
        "origins": len(origins),
        "robots_fetched": len(origins) - cached_before,
        "robots_cached": cached_before,
        "robots_fetch_seconds": round(fetch_seconds, 3),
        "origins_with_rules": sum(isinstance(s, RobotsRules) for s in states),
        "origins_without_robots": sum(s is None for s in states),
        "origins_unreachable": sum(isinstance(s, tuple) and s[0] == "robots_unreachable"
                                   for s in states),
        "origins_blocked": sum(isinstance(s, tuple) and s[0] == "blocked_address"
                               for s in states),
        "guard": guard_stats,
    }
