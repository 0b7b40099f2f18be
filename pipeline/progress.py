"""Progress bars that read well on a terminal and in a log file.

tqdm redraws a bar in place with '\\r' up to ten times a second. On a terminal that is one
moving line; in a log file (``make demo > demo.log 2>&1``, a cluster job's captured stderr)
every redraw is kept: thousands of them per stage. ``progress`` is tqdm on stderr that, when
its stream is not a terminal, redraws at most every 30 s: the log gets a line per half
minute of long work, and the final count. A new postfix (``set_postfix``) waits for the
next of those redraws.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

LOG_REDRAW_S = 30.0


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _LogBar(tqdm):
    """A bar on a non-terminal: a new postfix (loss, counts) waits for the next timed redraw
    instead of forcing one, as tqdm's ``set_postfix`` does by default."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool | None = True,
                    **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, on stderr unless ``file`` says otherwise."""
    kwargs.setdefault("file", sys.stderr)
    if is_terminal(kwargs["file"]):
        return tqdm(iterable, **kwargs)
    kwargs["mininterval"] = max(float(kwargs.get("mininterval", 0.1)), LOG_REDRAW_S)
    kwargs["maxinterval"] = kwargs["mininterval"]
    kwargs["dynamic_ncols"] = False
    return _LogBar(iterable, **kwargs)
