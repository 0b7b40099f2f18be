"""The Debian packages the demo's default build reads, what each gives, and what is lost without it.

`make demo` installs every missing one with one apt-get call (as root, where apt-get exists);
where that cannot happen it goes on with what there is and says, at the end, per missing part,
what the output lacks. Nothing here is read by `make test`: the tests use committed data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class DemoPart:
    name: str
    packages: tuple[str, ...]
    gives: str
    without: str  # what the demo's output lacks without it


PARTS: tuple[DemoPart, ...] = (
    DemoPart("images", ("openclipart-png", "openclipart-svg", "fonts-noto-color-emoji",
                        "tuxpaint-stamps-default", "unicode-data"),
             "the demo pool's real images (openclipart, Noto emoji, Tux Paint stamps)",
             "the pool is the small committed fixture (290 images), so the funnel, the "
             "training runs and the eval table are not the README's"),
    DemoPart("fashion_mnist", ("dataset-fashion-mnist",),
             "the Fashion-MNIST zero-shot eval set (real product photos)",
             "the eval table has no fashion_mnist row and decontamination does not check it"),
    DemoPart("wordnet", ("wordnet-base",),
             "WordNet 3.0 lemmas for the balance stage's metadata",
             "the metadata has only wordfreq words and numbers (~29k entries instead of "
             "~162k), so balance drops more rows as no_metadata_match than the README shows"),
)
ALL_PACKAGES: tuple[str, ...] = tuple(p for part in PARTS for p in part.packages)


def installed(package: str) -> bool:
    if not shutil.which("dpkg-query"):
        return False
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                       capture_output=True, text=True, check=False)
    return r.returncode == 0 and "install ok installed" in r.stdout


def why_not_installable() -> str | None:
    """None when apt-get can install packages here, else the reason it cannot."""
    if not shutil.which("dpkg-query") or not shutil.which("apt-get"):
        return "this machine has no apt-get/dpkg (not Debian or Ubuntu)"
    if os.geteuid() != 0:
        return "not root (run `sudo apt-get install ...` yourself, or make demo as root)"
    return None


def ensure_installed(packages: tuple[str, ...] = ALL_PACKAGES) -> dict[str, str]:
    """Install the missing packages with one apt-get call where we can; return
    {package: why it is still missing} for those that are not installed afterwards."""
    missing = [p for p in packages if not installed(p)]
    if not missing:
        return {}
    why = why_not_installable()
    if why is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False,
                       stdout=subprocess.DEVNULL)
        r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                            *missing], env=env, check=False, capture_output=True, text=True)
        why = (f"apt-get install failed: {r.stderr.strip().splitlines()[-1]}"
               if r.returncode != 0 and r.stderr.strip() else "apt-get install failed")
    return {p: why for p in missing if not installed(p)}


def missing_parts(still_missing: dict[str, str]) -> list[tuple[DemoPart, str]]:
    """The demo parts that lack a package, with the reason it could not be installed."""
    out = []
    for part in PARTS:
        lacking = [p for p in part.packages if p in still_missing]
        if lacking:
            out.append((part, f"{', '.join(lacking)}: {still_missing[lacking[0]]}"))
    return out


def missing_lines(still_missing: dict[str, str]) -> list[str]:
    """One line per missing part: what it is, why it is missing, what the output lacks."""
    return [f"MISSING {part.name} ({part.gives}) — {why}; so {part.without}. Install with: "
            f"apt-get install {' '.join(part.packages)}"
            for part, why in missing_parts(still_missing)]
