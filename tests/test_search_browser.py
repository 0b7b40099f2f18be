"""The search page in a real browser (Debian's chromium via selenium, pages/browser.py) against a
real server over the small real build of tests/search_fixtures.py: a text query and an image
query render their results with loaded thumbnails, a click searches by the clicked image, the
query lives in the URL (back, reload and a shared link give the same results), filters,
the JSON export, and a hostile caption shown as text with no script run. Screenshots go to
runs/screenshots/search_*.png for a person to look at."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from pages.browser import driver, full_page_screenshot
from pages.search_index import SearchIndex
from tests.search_fixtures import HOSTILE, make_search_build, serving

SHOTS = Path(__file__).resolve().parents[1] / "runs" / "screenshots"


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return make_search_build(tmp_path_factory.mktemp("search_browser"))


@pytest.fixture(scope="module")
def page(build):
    ix = SearchIndex.open(build.cfg)
    with serving([ix]) as server, driver(1280, 900) as d:
        d.set_script_timeout(30)
        yield server, d
    ix.close()


def wait_results(d, timeout: float = 30) -> list[dict]:
    """Wait until the page has searched and every thumbnail has loaded (or failed); return
    the rendered cards as the user sees them."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(d, timeout).until(lambda d: d.execute_script(
        "const s = document.getElementById('summary').textContent;"
        "const imgs = [...document.querySelectorAll('#results img.thumb')];"
        "return s.includes('nearest') && imgs.length > 0 && imgs.every(i => i.complete);"))
    return d.execute_script("""
        return [...document.querySelectorAll('#results .result')].map(c => ({
          uid: c.dataset.uid,
          caption: c.querySelector('.caption').textContent,
          verdict: c.querySelector('.verdict').textContent,
          width: c.querySelector('img.thumb').naturalWidth}));""")


def query_of(d) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(d.current_url).query).items()}


def test_text_query_renders_results_with_thumbnails(build, page):
    server, d = page
    uid = "oc-dragon_head_nicu_buculei_01"
    caption = build.captions[uid]
    d.get(server.url + f"?q={quote(caption)}&modality=text")
    cards = wait_results(d)
    assert cards[0]["uid"] == uid and cards[0]["caption"] == caption == "dragon head nicu buculei"
    assert len(cards) == 40 and all(c["width"] > 0 for c in cards)  # every image decoded
    verdicts = {c["verdict"].split(":")[0] for c in cards}
    assert "kept" in verdicts and any(v.startswith("dropped by 1") for v in verdicts)
    full_page_screenshot(d, SHOTS / "search_text.png")


def test_image_query_then_click_searches_by_the_clicked_image(build, page, tmp_path):
    server, d = page
    d.get(server.url)
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(d, 20).until(lambda d: d.execute_script("return document.body.dataset.ready"))
    uid = build.png
    f = tmp_path / "query.png"
    f.write_bytes(build.images[uid])
    d.find_element("id", "file").send_keys(str(f))
    cards = wait_results(d)
    assert cards[0]["uid"] == uid and query_of(d).get("image") == "uploaded"
    assert all(c["width"] > 0 for c in cards), [c for c in cards if not c["width"]]
    SHOTS.mkdir(parents=True, exist_ok=True)
    d.set_window_size(1280, 900)  # an earlier full-page shot left the window page-high
    d.save_screenshot(str(SHOTS / "search_top.png"))  # the first screen, as docs/ show it
    full_page_screenshot(d, SHOTS / "search_image.png")

    copies = set(build.copy)
    target = next(c for c in cards[2:] if c["uid"] not in copies)
    d.find_element("css selector", f'.result[data-uid="{target["uid"]}"] img.thumb').click()
    WebDriverWait(d, 20).until(lambda d: query_of(d).get("uid") == target["uid"])
    clicked = wait_results(d)
    assert clicked[0]["uid"] == target["uid"]  # its own stored embedding is nearest
    # the URL is the query: a fresh load of it (a shared link) shows the same results
    shared = d.current_url
    d.get("about:blank")
    d.get(shared)
    assert [c["uid"] for c in wait_results(d)] == [c["uid"] for c in clicked]


def test_filters_and_the_json_export(build, page):
    server, d = page
    d.get(server.url + "?q=a%20red%20flag&modality=image")
    wait_results(d)
    from selenium.webdriver.support.ui import Select, WebDriverWait

    Select(d.find_element("id", "status")).select_by_value("dropped")
    WebDriverWait(d, 20).until(lambda d: query_of(d).get("status") == "dropped")
    cards = wait_results(d)
    assert cards and all(c["verdict"].startswith("dropped by ") for c in cards)
    Select(d.find_element("id", "reason")).select_by_value("semantic_duplicate")
    WebDriverWait(d, 20).until(lambda d: query_of(d).get("reason") == "semantic_duplicate")
    cards = wait_results(d)
    assert cards and all("semantic_duplicate" in c["verdict"] for c in cards)
    # the export is the results as JSON: catch the blob the button hands to the browser and
    # the link it clicks (not followed: headless Chrome would save the file somewhere)
    name, exported = d.execute_async_script("""
        const done = arguments[arguments.length - 1];
        let blob;
        const real = URL.createObjectURL.bind(URL);
        URL.createObjectURL = (b) => { blob = b; return real(b); };
        HTMLAnchorElement.prototype.click = function () {
          const name = this.download;
          blob.text().then((text) => done([name, text]));
        };
        document.getElementById('export').click();""")
    data = json.loads(exported)
    assert name == "witforge-search.json"
    assert [r["uid"] for r in data["results"]] == [c["uid"] for c in cards]
    assert data["query"]["text"] == "a red flag" and data["query"]["filter"]["status"] == "dropped"
    # back: the previous query (status filter only) again
    d.back()
    WebDriverWait(d, 20).until(lambda d: "reason" not in query_of(d))
    assert all(c["verdict"].startswith("dropped by ") for c in wait_results(d))


def test_a_hostile_caption_is_text_and_runs_nothing(build, page):
    server, d = page
    d.get(server.url + "?q=" + quote(HOSTILE) + "&modality=text")
    cards = wait_results(d)
    assert cards[0]["uid"] == build.hostile and cards[0]["caption"] == HOSTILE
    assert d.execute_script("return window.__pwned") is None
    # no element was made from the caption: the only images are the thumbnails
    assert d.execute_script(
        "return document.querySelectorAll('#results img:not(.thumb), img[src=\"x\"]').length") == 0
    assert d.execute_script(
        "return document.querySelector('.result img.thumb').alt") == HOSTILE
    full_page_screenshot(d, SHOTS / "search_hostile.png")
