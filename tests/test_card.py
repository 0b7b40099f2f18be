"""witforge card: the data card of a real small build, opened from file:// in headless chromium.

The build is the demo build on the committed fixture pool (the demo web on 127.0.0.1), with
one more source of hostile rows (script and onerror captions, a URL that breaks out of an
attribute) and one more eval set holding a copy of a served image, so decontamination has a
hit to show beside its eval image. Screenshots go to runs/screenshots/ for a person to look at.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import duckdb
import pytest

from pages.browser import driver, full_page_screenshot
from pages.card import write_card
from pages.card_data import _sql, sample_key, sample_uids
from pages.card_html import environment
from pages.thumbs import Thumbs
from pipeline.cli import main as cli_main
from pipeline.config import load_build
from pipeline.demo import main as demo_main
from pipeline.stage import read_report
from tests.test_demo_e2e import REPO, _demo_build

SCRIPT_CAPTION = "<script>window.__pwned=1</script> a red apple on a wooden table"
ONERROR_CAPTION = '<img src=x onerror="window.__pwned=1"> a small blue car on the road'
SCREENSHOTS = REPO / "runs" / "screenshots"


def _add_hostile_rows_and_eval_set(y: Path) -> None:
    """A source of hostile rows on the demo web, and an eval set with a served image in it."""
    root = y.parent.parent
    base = json.loads((root / "demo_data" / "manifests" / "web.json").read_text())["base_url"]
    pool = root / "demo_data" / "pool"
    square = duckdb.sql(f"""SELECT image_id, file FROM '{pool / "pool.parquet"}'
        WHERE split = 'web' AND width = height AND file LIKE '%.png'
        ORDER BY image_id""").fetchall()
    (a, _), (b, _), (c, _), (d, d_file) = square[:4]
    rows = [
        {"url": f"{base}/img/{a}", "caption": SCRIPT_CAPTION},
        {"url": f"{base}/img/{b}", "caption": ONERROR_CAPTION},
        {"url": f'{base}/img/{c}?q="><script>window.__pwned=1</script>',
         "caption": "a green tree standing alone in the park"},
        {"url": f"{base}/img/{d}", "caption": "a picture that is also in an eval set"},
        {"url": f"{base}/img/{d}", "caption": "<b>x</b>"},  # dropped by the text filter
    ]
    (y.parent / "hostile.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "card_eval" / "test").mkdir(parents=True)
    with tarfile.open(root / "card_eval" / "test" / "0.tar", "w") as tf:
        tf.add(pool / d_file, arcname="s0000.png")
        info = tarfile.TarInfo("s0000.cls")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"0"))
    text = y.read_text()
    text = text.replace("demo_web: true\n", "  - {path: hostile.jsonl, url_col: url, "
                        "caption_col: caption, tag: hostile}\ndemo_web: true\n")
    text = text.replace("  eval_sets:\n", "  eval_sets:\n    - ../card_eval\n")
    for line in [ln for ln in text.splitlines() if "../demo_data/eval/" in ln]:
        if not (y.parent / line.split("- ", 1)[1] / "test").is_dir():  # not made here
            text = text.replace(line + "\n", "")  # (the demo leaves it out the same way)
    text = text.replace("  zeroshot:\n  retrieval:", "  zeroshot: []\n  retrieval:")
    y.write_text(text)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The card of the small build, written by `witforge run` at its end; then a short
    training run and `witforge card` again, so the training section has something to show."""
    y = _demo_build(tmp_path_factory.mktemp("card"), steps=2)
    # the demo's own start: pool, eval sets, metadata, manifests and the web's address
    assert demo_main(["--build", str(y), "--fixture-only", "--no-train", "--until",
                      "ingest"]) == 0
    _add_hostile_rows_and_eval_set(y)
    assert cli_main(["run", "--build", str(y)]) == 0
    assert (load_build(y).run_dir / "card" / "index.html").is_file()  # written by run
    assert cli_main(["train", "--build", str(y)]) == 0
    assert cli_main(["evaluate", "--build", str(y)]) == 0
    assert cli_main(["card", "--build", str(y)]) == 0
    return y


def _ledger(y: Path) -> list[tuple[str, int, int, int]]:
    """(stage folder, rows in, kept, dropped) straight from the stage folders."""
    run = load_build(y).run_dir
    out = []
    for folder in sorted(p for p in run.iterdir() if (p / "_SUCCESS").is_file()):
        kept, dropped = (duckdb.sql(f"SELECT count(*) FROM '{folder / f}'").fetchall()[0][0]
                         for f in ("kept.parquet", "dropped.parquet"))
        out.append((folder.name, read_report(folder)["rows_in"], kept, dropped))
    return out


def test_the_card_renders_in_a_real_browser(built: Path) -> None:
    y = built
    page = load_build(y).run_dir / "card" / "index.html"
    ledger = _ledger(y)
    assert ledger[0][0] == "01_ingest" and ledger[-1][0] == "14_shard"
    with driver(1400, 1000) as d:
        d.get(page.as_uri())
        # the funnel shows the ledger's numbers, stage by stage
        shown = d.execute_script("""return Array.from(
            document.querySelectorAll('#funnel-table tr[data-stage]')).map(r => [
            r.dataset.stage, ...['in', 'kept', 'dropped'].map(c =>
            parseInt(r.querySelector('td.' + c).textContent.replace(/,/g, '')))])""")
        assert [tuple(r) for r in shown] == ledger
        # reason grids: every stage's drop reasons have a block with tiles
        blocks = d.execute_script("""return Array.from(document.querySelectorAll(
            '.reason-block')).map(b => [b.id, b.querySelectorAll('.tile').length])""")
        ids = {i for i, _ in blocks}
        run = load_build(y).run_dir
        reasons = {f"reason-{f.name}-{r}" for f in run.iterdir() if (f / "_SUCCESS").is_file()
                   for (r,) in duckdb.sql(f"SELECT DISTINCT reason FROM "
                                          f"'{f / 'dropped.parquet'}'").fetchall()}
        assert "reason-02_text_filter-junk_caption" in reasons  # the hostile rows' filter
        assert ids == reasons and all(n > 0 for _, n in blocks)
        # thumbnails really load (decoded pixels), in the drops and the kept grid
        loaded = """return Array.from(document.querySelectorAll(arguments[0] + ' img'))
            .filter(i => i.complete && i.naturalWidth > 0).length"""
        assert d.execute_script(loaded, "#reason-08_image_dedup-duplicate_image_sha256") > 0
        assert d.execute_script(loaded, "#kept-random") > 10
        # the decontamination hit stands beside the eval image it matched, both loaded
        hit = "#reason-09_decontaminate-eval_contamination"
        assert d.execute_script(loaded, hit) >= 2
        assert "eval image" in d.find_element("css selector", hit).text
        # nothing the page holds runs: no script element, no image from a caption
        assert d.execute_script("return typeof window.__pwned") == "undefined"
        assert d.execute_script("return document.scripts.length") == 0
        assert d.execute_script("return document.querySelectorAll('img[src=x]').length") == 0
        # the later sections are there: images, balance, training
        for section in ("captions", "images", "crawl-errors", "balance", "training"):
            assert d.find_element("id", section).text
        assert d.execute_script(loaded, "#training") >= 1  # curves.png
        assert "plan.json" in d.find_element("id", "plan").text  # skipped, with a note
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(SCREENSHOTS / "card_top.png"))
        full_page_screenshot(d, SCREENSHOTS / "card.png", max_height=40000)


def test_hostile_captions_and_urls_show_as_text(built: Path, tmp_path: Path) -> None:
    """A card showing every drop and every kept pair, so each hostile row is on it wherever
    curation sent it (the demo's settings decide that, not this test)."""
    cfg = load_build(built)
    plan = {"target_rows": 1_000_000_000, "stages": [
        {"stage": "crawl", "cpu_hours": 1234.4, "note": "<script>window.__pwned=1</script>"}]}
    (cfg.run_dir / "plan.json").write_text(json.dumps(plan))  # as `witforge plan` would
    try:
        page = write_card(cfg, tmp_path / "all", samples=1000, clusters=1000, kept=1000,
                          log=lambda s: None)
    finally:
        (cfg.run_dir / "plan.json").unlink()
    with driver(1400, 1000) as d:
        d.get(page.as_uri())
        caps = d.execute_script("""return Array.from(document.querySelectorAll('.tile .cap'))
            .map(p => p.textContent)""")
        assert SCRIPT_CAPTION in caps and ONERROR_CAPTION in caps and "<b>x</b>" in caps
        urls = d.execute_script("""return Array.from(document.querySelectorAll('.tile .url'))
            .map(p => p.title)""")
        assert any(u.endswith('?q="><script>window.__pwned=1</script>') for u in urls)
        plan_text = d.find_element("id", "plan").text
        assert "1,000,000,000" in plan_text and "1,234" in plan_text
        assert "<script>window.__pwned=1</script>" in plan_text
        assert d.execute_script("return typeof window.__pwned") == "undefined"
        assert d.execute_script("return document.scripts.length") == 0
        assert d.execute_script("return document.querySelectorAll('img[src=x]').length") == 0
        tile = d.execute_script("""return Array.from(document.querySelectorAll('.tile')).find(
            t => t.querySelector('.cap') && t.querySelector('.cap').textContent ===
            arguments[0])""", SCRIPT_CAPTION)
        d.execute_script("arguments[0].scrollIntoView()", tile)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        tile.screenshot(str(SCREENSHOTS / "card_hostile_tile.png"))


def test_hostile_text_is_escaped_and_samples_are_deterministic(tmp_path: Path) -> None:
    # escaping, without a browser: the caption, url and detail come out as text
    t = {"uid": "u" * 32, "caption": SCRIPT_CAPTION, "url": 'http://x/"><b>', "source": "s",
         "reason": "two_words", "detail": ONERROR_CAPTION, "thumb": None, "size": "",
         "clip_score": None, "no_image": "not downloaded"}
    env = environment(Thumbs(tmp_path / "thumbs", tmp_path))
    html = str(env.get_template("macros.html.j2").module.tile(t))
    assert "<script>" not in html and "<img src=x" not in html and '"><b>' not in html
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=&#34;window.__pwned=1&#34;&gt;" in html
    # the uid-hash sample: independent of order, and the SQL draws the same rows
    uids = [f"{i:032x}" for i in range(200)]
    a = sample_uids(uids, 7, "two_words")
    assert a == sample_uids(list(reversed(uids)), 7, "two_words") and len(a) == 7
    assert a != sample_uids(uids, 7, "english")  # another purpose, another sample
    assert a == sorted(uids, key=lambda u: sample_key(u, "two_words"))[:7]
    for order in ("uid", "uid DESC"):
        p = tmp_path / f"d_{order.replace(' ', '_')}.parquet"
        duckdb.sql(f"""COPY (SELECT u AS uid, 'text_filter' AS stage, 'english' AS reason,
                       'false' AS detail FROM unnest({uids}) t(u) ORDER BY {order})
                       TO '{p}' (FORMAT parquet)""")
        got = duckdb.connect().execute(_sql("card_reason_samples.sql"), {
            "dropped": str(p), "stage": "text_filter", "n": 7}).fetchall()
        assert [u for _, u, _ in got] == sample_uids(uids, 7, "text_filter:english")
