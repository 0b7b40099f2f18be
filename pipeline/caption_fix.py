"""ftfy's caption repair, with a fast exit for captions ftfy would return unchanged.

``ftfy.fix_text`` costs 25-90 µs per caption even when it changes nothing: it runs every
fixer and a Unicode normalization on every call. Most non-ASCII web captions ("café",
"東京", "½ €") come back unchanged, so ``fix_caption`` first asks the questions ftfy's own
code asks before it can change anything, with ftfy's own tables, and calls it only when one
of them says yes:

- mojibake: ``ftfy.badness.is_bad`` (``fix_encoding`` returns text that is not "bad"
  unchanged);
- HTML entities need a ``&``; terminal escapes an ESC; line-break fixes ``\\r``, U+2028,
  U+2029 or U+0085; ``fix_text`` fixes each ``\\n``-separated line on its own;
- the character fixers act only on characters in their tables: C1 controls, Latin
  ligatures, full/half-width forms, curly quotes, surrogates, control characters;
- NFC normalization changes only text that is not NFC already.

A caption none of these apply to is returned as it is; one whose only trigger is curly
quotes comes back uncurled. Both are what ``fix_text`` would return: tests/test_caption_fix.py
checks every BMP code point and random text against ftfy itself. 3-20 µs per caption
instead of 25-90. Mojibake still runs ftfy's ``fix_encoding`` in full, and only then the
questions above on its result (``_fix_mojibake`` says why that is the same): ~40 µs, not ~85.
"""

from __future__ import annotations

import re
import unicodedata

import ftfy
from ftfy import chardata
from ftfy.badness import is_bad
from ftfy.fixes import uncurl_quotes

MAX_SEGMENT = ftfy.TextFixerConfig().max_decode_length
_ENCODING_ONLY = ftfy.TextFixerConfig(explain=False)


def _trigger_pattern() -> re.Pattern[str]:
    chars = set("&\n\r\x1b\u2028\u2029\x85")
    chars |= {chr(c) for c in range(0x80, 0xA0)}  # C1 controls (fix_c1_controls)
    chars |= {chr(c) for c in chardata.LIGATURES}
    chars |= {chr(c) for c in chardata.WIDTH_MAP}
    chars |= {chr(c) for c in chardata.CONTROL_CHARS}
    klass = "".join(re.escape(c) for c in sorted(chars))
    quotes = chardata.SINGLE_QUOTE_RE.pattern[1:-1] + chardata.DOUBLE_QUOTE_RE.pattern[1:-1]
    return re.compile(f"[{klass}{quotes}\ud800-\udfff]")


_TRIGGER = _trigger_pattern()


def _clean(text: str) -> bool:
    """No trigger character and NFC already: only mojibake could still change it."""
    return not _TRIGGER.search(text) and unicodedata.is_normalized("NFC", text)


def ftfy_would_change(text: str) -> bool:
    """False only when ``ftfy.fix_text(text) == text`` is certain without running it."""
    return len(text) > MAX_SEGMENT or is_bad(text) or not _clean(text)


def fix_caption(text: str) -> str:
    """``ftfy.fix_text(text)``, skipping the call where its result is known."""
    if len(text) > MAX_SEGMENT:
        return ftfy.fix_text(text)
    if is_bad(text):
        return _fix_mojibake(text)
    if _clean(text):
        return text
    # Curly quotes are the commonest trigger (it’s, “…”). When uncurling them is the only
    # change, ftfy's first pass returns the uncurled text (mojibake is checked on the
    # original, the other fixers and NFC on the result) and its second pass changes nothing.
    uncurled = uncurl_quotes(text)
    if uncurled != text and _clean(uncurled) and not is_bad(uncurled):
        return uncurled
    return ftfy.fix_text(text)



def _fix_mojibake(text: str) -> str:
    """``fix_text`` of a caption ``is_bad`` flags, running only its encoding fixer in full.

    For one segment (no newline) without a '&', ``fix_text``'s first pass is: unescape (a
    no-op without '&'), ``fix_encoding`` (which loops to its own fixed point, so it is
    idempotent), then the character fixers and NFC; later passes repeat that on the result.
    ``fix_text(fix_encoding(text))`` therefore runs the same passes on the same strings, and
    its fixers are what the fast path above answers. A mojibake caption then costs ~40 µs
    instead of ~85: the fixers' full run is what it skips."""
    if "&" in text or "\n" in text:
        return ftfy.fix_text(text)
    decoded = ftfy.fix_encoding(text, _ENCODING_ONLY)
    if decoded == text or "&" in decoded or "\n" in decoded:
        return ftfy.fix_text(text)
    return fix_caption(decoded)  # decoded is a fixed point of fix_encoding: no second round
