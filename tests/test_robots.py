"""robots.txt: the RFC 9309 matcher, and the robots stage on a real server through the guard."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from pipeline.config import load_build
from pipeline.guard.hostile import HostileServer
from pipeline.guard.robotstxt import RobotsRules, origin_of, path_of
from pipeline.robots import crawl_delays
from pipeline.stage import kept_of, run_stage

WIKI_LIKE = """
# comments are ignored
User-agent: *
Disallow: /w/
Disallow: /api/
Allow: /w/load.php
Disallow: /*.pdf$
Disallow: /search*q=

User-agent: witforge
User-agent: otherbot
Disallow: /private/
Allow: /private/public/

user-agent: WITFORGE
disallow: /also-private
Disallow:
"""


@pytest.mark.parametrize("path,token,allowed", [
    ("/private/x.png", "witforge", False),
    ("/private/public/x.png", "witforge", True),  # the longer Allow wins
    ("/also-private/y", "witforge", False),  # groups for one agent are merged
    ("/w/index.php", "witforge", True),  # our own group replaces '*'
    ("/w/index.php", "somebot", False),
    ("/w/load.php", "somebot", True),
    ("/doc.pdf", "somebot", False), ("/doc.pdf?x=1", "somebot", True),  # '$' anchors
    ("/search/a?q=cat", "somebot", False),  # '*' inside a rule
    ("/robots.txt", "somebot", True),
    ("/", "somebot", True),
    ("/private/x.png", "WitForge", False),  # agents match case-insensitively
    ("/private/x.png", "witforgebot", True),  # ...but exactly: not a substring
])
def test_rfc9309_matching(path: str, token: str, allowed: bool) -> None:
    assert RobotsRules(WIKI_LIKE).verdict(path, token)[0] is allowed


def test_allow_wins_a_tie_and_percent_encoding_is_normalized() -> None:
    r = RobotsRules("User-agent: *\nDisallow: /a\nAllow: /a\nDisallow: /b~c\n")
    assert r.verdict("/a/x", "bot")[0] is True
    assert r.verdict("/b%7Ec", "bot")[0] is False
    assert RobotsRules("").verdict("/anything", "bot") == (True, None)


def test_origin_and_path() -> None:
    assert origin_of("HTTP://Example.com:80/a?b") == "http://example.com"
    assert origin_of("https://x.org:8443/p") == "https://x.org:8443"
    assert origin_of("file:///etc/passwd") is None
    assert path_of("http://x/a/b?c=d#frag") == "/a/b?c=d"


def _build(tmp: Path, urls: list[str], allow: list[str]) -> Path:
    (tmp / "m.jsonl").write_text("".join(json.dumps({"url": u, "caption": f"c{i}"}) + "\n"
                                         for i, u in enumerate(urls)))
    y = tmp / "b.yaml"
    y.write_text(f"name: r\nruns_dir: {tmp / 'runs'}\nsources: [{{path: m.jsonl}}]\n"
                 f"url_dedup: {{enabled: false}}\n"
                 f"crawl: {{robots: true, request_deadline: 1.0, allow_hosts: {allow}}}\n")
    return y


def test_robots_stage_drops_disallowed_urls_once_per_site(tmp_path: Path) -> None:
    with HostileServer() as web, HostileServer(robots_status=404) as open_site, \
            HostileServer(robots_status=503) as down, HostileServer() as internal:
        urls = [web.base_url + p for p in ("/ok.png", "/private/x.png", "/private/ok.png",
                                           "/nobody/x.png")]
        urls += [open_site.base_url + "/private/x.png", down.base_url + "/ok.png",
                 internal.base_url + "/ok.png"]
        allow = [f"127.0.0.1:{s.port}" for s in (web, open_site, down)]
        cfg = load_build(_build(tmp_path, urls, allow))
        for stage in ("ingest", "text_filter"):
            run_stage(cfg, stage)
        report = run_stage(cfg, "robots")
        dropped = duckdb.sql(f"SELECT reason, detail FROM "
                             f"'{kept_of(cfg, 'robots').parent / 'dropped.parquet'}'").fetchall()
        kept = {r[0] for r in duckdb.sql(f"SELECT url FROM '{kept_of(cfg, 'robots')}'").fetchall()}
        assert kept == {web.base_url + "/ok.png", web.base_url + "/private/ok.png",
                        web.base_url + "/nobody/x.png",  # the '*' group does not apply to us
                        open_site.base_url + "/private/x.png"}  # 404: no rules at all
        assert sorted(r for r, _ in dropped) == ["blocked_address", "robots_disallowed",
                                                 "robots_unreachable"]
        details = dict((d.split(" ")[0].rstrip(":"), r) for r, d in dropped)
        assert details[web.base_url + "/private/x.png"] == "robots_disallowed"
        assert details[down.base_url + "/robots.txt"] == "robots_unreachable"  # 503: RFC 9309
        assert details[internal.base_url + "/ok.png"] == "blocked_address"  # URL in detail
        assert any("'Disallow: /private/'" in d for _, d in dropped)
        assert report["rows_in"] == report["kept"] + report["dropped"] == len(urls)
        assert report["origins"] == 4 and report["robots_fetched"] == 4
        assert internal.hits == []  # not even robots.txt was asked of the internal service
        assert web.hits.count("/robots.txt") == 1

        # A rerun (forced) answers from the build's cache: no site is asked twice.
        again = run_stage(cfg, "robots", force=True)
        assert again["robots_fetched"] == 0 and again["robots_cached"] == 4
        assert web.hits.count("/robots.txt") == 1
        assert again["kept"] == report["kept"]


def test_crawl_delay_is_read_from_the_group_that_applies() -> None:
    rules = RobotsRules("User-agent: *\nCrawl-delay: 2\nDisallow: /x\n\n"
                        "User-agent: witforge\nCrawl-delay: 5\nCrawl-delay: 7.5\nAllow: /\n\n"
                        "User-agent: quietbot\nDisallow: /q\n\n"
                        "User-agent: oddbot\nCrawl-delay: soon\n")
    assert rules.crawl_delay("WitForge") == 7.5  # our own group; the largest it says
    assert rules.crawl_delay("somebot") == 2.0  # '*'
    assert rules.crawl_delay("quietbot") is None  # its own group says nothing: not '*'
    assert rules.crawl_delay("oddbot") is None  # not a number
    assert rules.verdict("/x", "somebot")[0] is False  # rules around it still parse
    assert RobotsRules("User-agent: *\nDisallow: /\n").crawl_delay("witforge") is None


def test_robots_stage_hands_crawl_delays_to_the_crawl(tmp_path: Path) -> None:
    with HostileServer(crawl_delay=4) as web:
        cfg = load_build(_build(tmp_path, [web.base_url + "/ok.png"], [f"127.0.0.1:{web.port}"]))
        for stage in ("ingest", "text_filter"):
            run_stage(cfg, stage)
        report = run_stage(cfg, "robots")
        assert report["hosts_with_crawl_delay"] == 1 and report["max_crawl_delay"] == 4.0
        assert crawl_delays(cfg) == {"127.0.0.1": 4.0}
        cfg.crawl.max_crawl_delay = 1.5
        assert crawl_delays(cfg) == {"127.0.0.1": 1.5}  # capped
        cfg.crawl.max_crawl_delay = 0
        assert crawl_delays(cfg) == {}  # 0: Crawl-delay is ignored


def test_the_crawl_spaces_requests_to_a_host_that_asks_for_a_crawl_delay(tmp_path: Path) -> None:
    with HostileServer(crawl_delay=0.4) as web:
        urls = [web.base_url + p for p in ("/ok.png", "/img/a.png", "/img/b.png", "/img/c.png")]
        y = _build(tmp_path, urls, [f"127.0.0.1:{web.port}"])
        y.write_text(y.read_text().replace("request_deadline: 1.0", "request_deadline: 5.0, "
                                           "processes_count: 1, thread_count: 4"))
        cfg = load_build(y)
        for stage in ("ingest", "text_filter", "robots"):
            run_stage(cfg, stage)
        report = run_stage(cfg, "crawl")
        assert report["kept"] == 4
        events = (kept_of(cfg, "crawl").parent.parent / "06_crawl.work").glob(
            "attempt_*/guard.jsonl")
        summary = [json.loads(x) for p in events for x in p.read_text().splitlines()][-1]
        assert summary["settings"]["domain_intervals"] == 1  # the host's Crawl-delay reached it
        images = [t for t, path in web.hit_times if path.startswith(("/ok.png", "/img/"))]
        images.sort()
        gaps = [b - a for a, b in zip(images, images[1:], strict=False)]
        assert len(images) == 4 and min(gaps) >= 0.35, gaps
