"""Arms of a curation experiment: the build with every curation step off (``raw``), or with one
step off (an ablation), each run as a build of its own beside the real one.

An arm lives in ``runs/<build>/compare/arms/<arm>/`` and runs the ordinary stages with a changed
config. Nothing is computed twice: before each of an arm's stages, a donor build (the real
build, or an arm run before it) whose same stage has the same fingerprint hands over its folder
as hard links, so the runner finds it up to date; the crawl's downloads are handed over the same
way, so an arm's crawl fetches only the rows no donor ever tried (for ``raw``: the rows the text
filters and URL dedup dropped before the crawl).

What ``raw`` keeps, and why: ingest (its exact-repeat collapse of identical url+caption: what any
downloader's input list would hold once), robots.txt (politeness, not curation), the crawl, and
decontamination (the eval sets' own images must not be trained on by any arm), then the shards.
Everything else is off — what img2dataset alone would give a user.

An ablation whose rows differ before the embed stage (no text filter, no URL dedup, no image
dedup) scores its pairs with the build's bootstrap fold models (``embed.bootstrap.models_from``)
instead of training its own: every pair is still out of fold, the arm trains nothing extra, and
the ablation measures the step's effect on the data with the scorer held fixed — as DataComp's
filtering baselines hold their OpenAI scorer fixed.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from pipeline.config import BuildConfig
from pipeline.stage import (
    StageSpec,
    enabled_stages,
    fingerprint_of,
    previous_stage,
    read_report,
    run_stage,
    stage_dir,
    stage_inputs,
)


def _raw(c: BuildConfig) -> None:
    c.text_filter.filters = []
    c.url_dedup.enabled = False
    c.precrawl_balance.enabled = False
    c.image_filter.filters = []
    c.image_dedup.enabled = False
    c.embed.checkpoint = ""  # no embed, clip_filter or semantic_dedup
    c.clip_filter.filters = []
    c.semantic_dedup.enabled = False
    c.balance.enabled = False


def _off(section: str, key: str, value) -> Callable[[BuildConfig], None]:
    return lambda c: setattr(getattr(c, section), key, value)


# arm -> how its config differs from the build's. An ablation of a step the build does not use
# is the build itself, and is left out (ablations_of).
ARMS: dict[str, Callable[[BuildConfig], None]] = {
    "raw": _raw,
    "no_text_filter": _off("text_filter", "filters", []),
    "no_url_dedup": _off("url_dedup", "enabled", False),
    "no_image_dedup": _off("image_dedup", "enabled", False),
    "no_semantic_dedup": _off("semantic_dedup", "enabled", False),
    "no_clip_filter": _off("clip_filter", "filters", []),
    "no_balance": _off("balance", "enabled", False),
}
ABLATIONS = [a for a in ARMS if a != "raw"]


def ablations_of(cfg: BuildConfig) -> list[str]:
    """The ablations that change this build (those whose step it runs)."""
    built = {s.name for s in enabled_stages(cfg)}
    return [a for a in ABLATIONS
            if {s.name for s in enabled_stages(arm_config(cfg, a))} != built
            or _stage_settings(arm_config(cfg, a)) != _stage_settings(cfg)]


def _stage_settings(cfg: BuildConfig) -> dict:
    return {s.name: stage_inputs(cfg, s, "")["settings"] for s in enabled_stages(cfg)}


def arms_dir(cfg: BuildConfig) -> Path:
    return cfg.run_dir / "compare" / "arms"


def arm_config(cfg: BuildConfig, arm: str) -> BuildConfig:
    """The build's config with ``arm``'s change, running in runs/<build>/compare/arms/<arm>/."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r} (arms: {', '.join(ARMS)})")
    c = copy.deepcopy(cfg)
    ARMS[arm](c)
    if not c.clip_filter.filters and not c.semantic_dedup.enabled:
        c.embed.checkpoint = ""  # nothing of the arm reads embeddings: no embed stage
    if (c.embed.checkpoint == "bootstrap" and not c.embed.bootstrap.models_from
            and _before_embed(c) != _before_embed(cfg)):
        # the arm's rows differ before the embed stage: score them with the build's fold
        # models (out of fold all the same) rather than train three more on other data
        c.embed.bootstrap.models_from = str(cfg.run_dir)
    c.name, c.runs_dir = arm, str(arms_dir(cfg))
    return c


def _before_embed(cfg: BuildConfig) -> list[tuple[str, dict]]:
    """The stages before embed, with their settings: equal lists mean equal rows at embed."""
    out = []
    for s in enabled_stages(cfg):
        if s.name == "embed":
            break
        out.append((s.name, stage_inputs(cfg, s, "")["settings"]))
    return out


def link_copy(src: Path, dst: Path) -> None:
    """A copy of folder ``src`` whose large files are hard links (free, and never written in
    place by the stages) and small ones real copies (a resumed attempt appends to its
    confirmed.txt)."""
    def copy_file(a: str, b: str) -> None:
        if os.path.getsize(a) >= 64 * 1024:
            try:
                os.link(a, b)
                return
            except OSError:  # another file system: copy
                pass
        shutil.copy2(a, b)

    tmp = dst.with_name(dst.name + f".linking-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=copy_file, symlinks=True)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def _fingerprint(cfg: BuildConfig, spec: StageSpec) -> str | None:
    """The fingerprint ``run_stage`` will give this stage now (None: its upstream is not done)."""
    prev = previous_stage(cfg, spec)
    upstream = ""
    if prev is not None:
        report = read_report(stage_dir(cfg, prev))
        if report is None:
            return None
        upstream = report["fingerprint"]
    return fingerprint_of(stage_inputs(cfg, spec, upstream))


def _adopt(cfg: BuildConfig, spec: StageSpec, donors: list[BuildConfig]) -> str | None:
    """Hand over a donor's finished stage folder (and its work folder) with this stage's
    fingerprint; returns the donor's name, or None."""
    fp = _fingerprint(cfg, spec)
    mine = read_report(stage_dir(cfg, spec))
    if fp is None or (mine and mine.get("fingerprint") == fp):
        return None
    for donor in donors:
        theirs = read_report(stage_dir(donor, spec))
        if theirs and theirs.get("fingerprint") == fp:
            link_copy(stage_dir(donor, spec), stage_dir(cfg, spec))
            return donor.name
    return None


def _seed_work(cfg: BuildConfig, spec: StageSpec, donors: list[BuildConfig]) -> None:
    """Give an arm's stage the donors' work folder (the crawl's downloads), when it has none:
    the donor that tried the most attempts, so the crawl fetches only rows nobody tried."""
    work = cfg.run_dir / f"{spec.folder}.work"
    if work.exists():
        return
    have = [d.run_dir / f"{spec.folder}.work" for d in donors]
    have = [w for w in have if w.is_dir()]
    if have:
        best = max(have, key=lambda w: len(list(w.glob("attempt_*"))))
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        link_copy(best, work)


def run_arm(cfg: BuildConfig, arm: str, donors: list[BuildConfig],
            log: Callable[[str], None] = print,
            explain: Callable | None = None) -> BuildConfig:
    """Run every stage of ``arm`` (adopting donors' identical stages); its config."""
    c = arm_config(cfg, arm)
    for spec in enabled_stages(c):
        got = _adopt(c, spec, donors)
        if got:
            log(f"[{arm}/{spec.folder}] the same as {got}'s, linked")
        if spec.name == "crawl":
            _seed_work(c, spec, donors)
        run_stage(c, spec.name, log=lambda s, a=arm: log(f"[{a}] {s}"), explain=explain)
    return c
