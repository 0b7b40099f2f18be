"""The docs cover the code: every build-file key (with its default), make target, witforge
command and flag is documented; the README stays a front door; every relative link resolves.

Rules, one each:
- build keys: docs/build-yaml.md has a table row whose first cell is the key in backticks,
  dotted as in error messages (`crawl.timeout`, `sources[].path`, `name`), and whose second
  cell is the default in backticks as YAML (or ``required``);
- make targets: ``make <target>`` appears in README.md or docs/*.md;
- witforge commands and their flags: ``witforge <command>`` and each ``--flag`` appear in
  docs/*.md; the flags of ``witforge train`` and ``witforge evaluate`` in docs/training.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import cli
from pipeline.config import BuildConfig

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
BUILD_YAML = DOCS / "build-yaml.md"
TRAINING = DOCS / "training.md"
README_MAX_LINES = 300
# a table row whose first cell is one backticked name: | `crawl.timeout` | `5` | ... |
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*([^|]*?)\s*\|")


def doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def docs_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in doc_pages())


def mentions(text: str, phrase: str) -> bool:
    """``phrase`` occurs as a whole: `make demo` is not found inside `make demo-data`."""
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", text) is not None


# ---- build keys ---------------------------------------------------------------------------

def config_keys(cls: type = BuildConfig, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, dataclasses.Field) of every YAML leaf key; list[Source] -> sources[].path."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from config_keys(tp, key + ".")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            yield from config_keys(typing.get_args(tp)[0], key + "[].")
        else:
            yield key, f


def section_names(cls: type = BuildConfig, prefix: str = "") -> set[str]:
    """Keys that hold a section or a list of sections (crawl, sources): rows allowed, not needed."""
    hints, out = typing.get_type_hints(cls), set()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(tp) or (inner is not None and dataclasses.is_dataclass(inner)):
            out.add(prefix + f.name)
    return out


def documented_rows() -> dict[str, str]:
    rows = {}
    for line in BUILD_YAML.read_text(encoding="utf-8").splitlines():
        m = ROW.match(line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def default_of(f: Any) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def same_default(cell: str, default: Any) -> bool:
    if default is dataclasses.MISSING:
        return cell == "required"
    m = re.fullmatch(r"`([^`]*)`", cell)
    if not m:
        return False
    value = yaml.safe_load(m.group(1))
    if isinstance(default, bool):
        return value is default
    if isinstance(default, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value)  # inf, 5e-4: YAML 1.1 reads these as strings
            except ValueError:
                return False
        return not isinstance(value, bool) and value == default
    if isinstance(default, str):
        return value == default or m.group(1) == default
    return value == default


def test_every_build_key_has_a_row_in_build_yaml_md() -> None:
    rows = documented_rows()
    missing = [key for key, _ in config_keys() if key not in rows]
    assert not missing, (
        f"{BUILD_YAML.relative_to(ROOT)} has no table row `| `<key>` | <default> | <meaning> |` "
        f"for these BuildConfig keys: {', '.join(missing)}")


def test_build_yaml_md_defaults_match_the_config() -> None:
    rows = documented_rows()
    wrong = [f"{key}: docs say {rows[key]}, code says {default_of(f)!r}"
             for key, f in config_keys() if key in rows and not same_default(rows[key],
                                                                              default_of(f))]
    assert not wrong, (f"{BUILD_YAML.relative_to(ROOT)}: defaults differ from "
                       f"pipeline/config.py:\n  " + "\n  ".join(wrong))


def test_build_yaml_md_documents_no_key_the_config_lacks() -> None:
    known = {key for key, _ in config_keys()} | section_names()
    unknown = sorted(set(documented_rows()) - known)
    assert not unknown, (f"{BUILD_YAML.relative_to(ROOT)} has rows for keys BuildConfig does "
                         f"not have: {', '.join(unknown)}")


def test_the_key_walk_sees_nested_and_list_sections() -> None:
    keys = dict(config_keys())
    assert {"name", "sources[].path", "crawl.request_deadline", "eval.templates"} <= set(keys)
    assert "path" not in keys  # internal: set by the loader, not a YAML key


# ---- make targets -------------------------------------------------------------------------

def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    targets = set(re.search(r"^STAGES\s*:=\s*(.*)$", text, re.M).group(1).split())
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z][\w.-]*(?:[ \t]+[A-Za-z][\w.-]*)*)[ \t]*:(?!=)", line)
        if m:
            targets |= set(m.group(1).split())
    return targets


def test_every_make_target_is_documented() -> None:
    targets = make_targets()
    assert {"demo", "test", "lock", "status", "ingest", "shard"} <= targets
    text = README.read_text(encoding="utf-8") + docs_text()
    missing = sorted(t for t in targets if not mentions(text, f"make {t}"))
    assert not missing, ("no `make <target>` in README.md or docs/ for: " + ", ".join(missing))


# ---- witforge commands and flags ----------------------------------------------------------

def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def long_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings
            if s.startswith("--") and s != "--help"}


def tool_flags(name: str) -> set[str]:
    """The --flags of a tool that owns its parsing, read from its own --help."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        importlib.import_module(cli.TOOLS[name][0]).main(["--help"])
    flags = set()
    for line in out.getvalue().splitlines():
        if re.match(r"^\s{1,4}-", line):
            flags |= set(re.findall(r"(?<![\w-])--[a-z][\w-]*", line))
    return flags - {"--help"}


def test_every_witforge_command_is_documented() -> None:
    commands = set(subcommands())
    assert {"run", "status", "audit", "explain", "crawl", "train", "evaluate"} <= commands
    text = docs_text()
    missing = sorted(c for c in commands if not mentions(text, f"witforge {c}"))
    assert not missing, "no `witforge <command>` in docs/ for: " + ", ".join(missing)


def test_every_flag_of_the_stage_and_build_commands_is_documented() -> None:
    text = docs_text()
    missing = sorted(f"witforge {name} {flag}" for name, p in subcommands().items()
                     if name not in cli.TOOLS for flag in long_flags(p)
                     if not mentions(text, flag))
    assert not missing, "flags missing from docs/: " + ", ".join(missing)


def test_every_flag_of_the_tools_is_documented() -> None:
    text, training = docs_text(), TRAINING.read_text(encoding="utf-8")
    missing = []
    for name in cli.TOOLS:
        flags = long_flags(_train_parser()) if name == "train" else tool_flags(name)
        where = training if name in ("train", "evaluate") else text
        missing += [f"witforge {name} {f}" for f in sorted(flags) if not mentions(where, f)]
    assert not missing, ("flags missing from docs/ (train and evaluate: from "
                         "docs/training.md): " + ", ".join(missing))


def _train_parser() -> argparse.ArgumentParser:
    from training.options import _parser

    return _parser()


def test_train_and_evaluate_flags_are_read() -> None:
    assert {"--lr", "--worker-priority", "--weight-decay", "--wd"} <= long_flags(_train_parser())
    assert {"--checkpoint", "--templates", "--out"} <= tool_flags("evaluate")


# ---- the README and the links -------------------------------------------------------------

def test_readme_is_a_front_door() -> None:
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n < README_MAX_LINES, (f"README.md has {n} lines (limit {README_MAX_LINES}): move "
                                  "reference material into docs/")


FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slugs(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    seen: dict[str, int] = {}
    for line in FENCE.sub("", md.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        if n:
            seen[f"{slug}-{n}"] = 1
    return set(seen)


def links(md: Path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", md.read_text(encoding="utf-8")))
    return LINK.findall(text)


def test_every_relative_link_resolves() -> None:
    broken = []
    for md in [README, *doc_pages()]:
        for target in links(md):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in slugs(dest):
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n  " + "\n  ".join(broken)


def test_docs_index_lists_every_page() -> None:
    index = set(links(DOCS / "README.md"))
    missing = [p.name for p in doc_pages() if p.name != "README.md" and p.name not in index]
    assert not missing, "docs/README.md does not link: " + ", ".join(missing)
