"""index.html from the card's data: one Jinja2 template with autoescape on.

Captions, URLs and details are untrusted web text: autoescape turns every ``{{ }}`` into
text, and the page's Content-Security-Policy (no scripts, images only from the card's folder)
is a second wall should anything slip through. The only unescaped insert is the style sheet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape

from pages.thumbs import Thumbs

HERE = Path(__file__).parent


def num(v: Any) -> str:
    """1234567 -> '1,234,567'; floats to 4 significant digits; anything else as text."""
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def human_bytes(v: float | None) -> str:
    if v is None:
        return ""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(v) < 1024 or unit == "TB":
            return f"{v:,.0f} {unit}" if unit == "B" else f"{v:,.1f} {unit}"
        v /= 1024
    return ""


def trunc(v: Any, n: int) -> str:
    s = "" if v is None else str(v)
    return s if len(s) <= n else s[: n - 1] + "…"


def rows(items: list[dict[str, Any]], *keys: str) -> list[tuple]:
    return [tuple(d.get(k) for k in keys) for d in items]


def tree(v: Any, depth: int = 0) -> Markup:
    """Any JSON value as nested tables (lists of flat objects as one table), escaped."""
    if isinstance(v, dict):
        cells = "".join(f"<tr><td>{escape(k)}</td><td>{tree(x, depth + 1)}</td></tr>"
                        for k, x in v.items())
        return Markup(f'<table class="kv">{cells}</table>')
    if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
        keys = list(dict.fromkeys(k for x in v for k in x))
        head = "".join(f"<th>{escape(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{tree(x.get(k), depth + 1)}</td>" for k in keys)
                       + "</tr>" for x in v)
        return Markup(f"<table><tr>{head}</tr>{body}</table>")
    if isinstance(v, list):
        return Markup(", ".join(str(tree(x, depth + 1)) for x in v))
    return escape(num(v))


def environment(thumbs: Thumbs) -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=False, lstrip_blocks=False)
    env.filters.update(num=num, pct=pct, bytes=human_bytes, trunc=trunc, rows=rows, tree=tree)
    env.globals.update(
        thumb_src=thumbs.src,
        thumb_problem=lambda name: ("image unreadable: " + thumbs.failed[name])
        if name and name in thumbs.failed else "")
    return env


def render(data: dict[str, Any], thumbs: Thumbs) -> str:
    css = (HERE / "static" / "card.css").read_text(encoding="utf-8")
    return environment(thumbs).get_template("card.html.j2").render(css=css, **data)
