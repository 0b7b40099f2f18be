"""The typed build config: unknown or mistyped keys fail naming the key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_build

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "b.yaml"
    p.write_text(text)
    return p


def test_shipped_builds_parse() -> None:
    for y in sorted((REPO / "manifests").glob("*.yaml")):
        cfg = load_build(y)
        assert cfg.name and cfg.sources


def test_defaults_and_values(tmp_path: Path) -> None:
    cfg = load_build(_write(tmp_path, "name: x\nsources: [{path: a.csv}]\n"
                                      "crawl: {timeout: 3, max_aspect_ratio: inf}\n"))
    assert cfg.crawl.timeout == 3 and cfg.crawl.max_aspect_ratio == float("inf")
    assert cfg.crawl.disallowed_header_directives[0] == "noai"
    assert cfg.resolve("a.csv") == tmp_path / "a.csv"


@pytest.mark.parametrize("text, needle", [
    ("name: x\nsources: [{path: a}]\ncrawl: {timout: 3}\n", "crawl.timout"),
    ("name: x\nsources: [{path: a, urlcol: u}]\n", "sources[0].urlcol"),
    ("name: x\nsources: [{path: a}]\nbogus: 1\n", "bogus"),
    ("name: x\nsources: [{path: a}]\ncrawl: {timeout: fast}\n", "crawl.timeout"),
    ("name: x\nsources: [{path: a}]\ntrain: {lr: '1e-3x'}\n", "train.lr"),
    ("name: x\nsources: [{path: a}]\ncrawl: {resize_mode: squash}\n", "crawl.resize_mode"),
    ("name: x\nsources: [{path: a}]\ntrain: {worker_priority: high}\n",
     "train.worker_priority"),
    ("name: x\nsources: [{path: a, format: xls}]\n", "sources[0].format"),
    ("name: x\nsources: [{path: a}]\ncrawl: {max_crawl_delay: -1}\n", "crawl.max_crawl_delay"),
    ("sources: [{path: a}]\n", "missing required key name"),
    ("name: x\nsources: [{path: a}\n", "not valid YAML"),
])
def test_bad_keys_name_the_key_and_file(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_build(_write(tmp_path, text))
    assert needle in str(e.value) and "b.yaml" in str(e.value)


def test_missing_build_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_build(tmp_path / "nope.yaml")
