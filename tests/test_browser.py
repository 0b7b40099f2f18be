"""pages/browser.py: Debian's chromium runs headless from selenium with nothing downloaded."""

from __future__ import annotations

from pathlib import Path

from pages.browser import driver, full_page_screenshot


def test_headless_chromium_runs_scripts_and_loads_local_images(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    page = tmp_path / "p.html"
    page.write_text("<!doctype html><title>t</title><p id=x>static</p><img id=i src='red.png'>"
                    "<script>document.getElementById('x').textContent = 'scripted'</script>")
    with driver() as d:
        d.get(page.as_uri())
        assert d.title == "t"
        assert d.find_element("id", "x").text == "scripted"  # JavaScript ran
        d.execute_script("return document.getElementById('i').decode()")
        assert d.execute_script("return document.getElementById('i').naturalWidth") == 40
        shot = full_page_screenshot(d, tmp_path / "shot.png")
    assert shot.stat().st_size > 0 and Image.open(shot).width > 0
