"""A real headless browser for the page tests: Debian's chromium + chromedriver via selenium.

``ensure_chromium()`` installs the two Debian packages when they are missing and we are root
(the project's own setup, like the demo's packages); ``driver()`` opens headless Chrome with
the driver's path given explicitly, so selenium-manager never downloads a browser or driver.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
APT_PACKAGES = ("chromium", "chromium-driver")


class BrowserUnavailable(RuntimeError):
    """chromium or chromedriver is missing and cannot be installed here."""


def ensure_chromium(install: bool = True) -> tuple[Path, Path]:
    """(chromium, chromedriver), installing Debian's packages first if needed and allowed."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return CHROMIUM, CHROMEDRIVER
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if not install or os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BrowserUnavailable(
            f"missing {', '.join(missing)}: install them with `apt-get install -y "
            f"--no-install-recommends {' '.join(APT_PACKAGES)}` (as root, on Debian/Ubuntu)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        # A fresh container has no package lists yet: fetch them once and try again.
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise BrowserUnavailable(f"`{' '.join(cmd)}` failed: {' | '.join(tail)}")
    return CHROMIUM, CHROMEDRIVER


@contextmanager
def driver(width: int = 1280, height: int = 900) -> Iterator[WebDriver]:
    """A headless Chrome session; quit on exit. No network is needed to start it."""
    chromium, chromedriver = ensure_chromium()
    # selenium-manager would look for (and download) drivers; every path is given instead
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(chromium)
    for arg in ("--headless=new", "--no-sandbox",  # root cannot use chromium's sandbox
                "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--disable-background-networking",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    d = webdriver.Chrome(options=opts, service=Service(executable_path=str(chromedriver)))
    try:
        yield d
    finally:
        d.quit()


def full_page_screenshot(d: WebDriver, path: Path, max_height: int = 12000) -> Path:
    """Resize the window to the page's height (headless Chrome shoots only the viewport)."""
    height = int(d.execute_script(
        "return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)"))
    width = int(d.execute_script("return window.innerWidth")) or 1280
    d.set_window_size(width, min(max(height, 400), max_height))
    path.parent.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(path))
    return path
