"""fix_caption must return exactly what ftfy.fix_text returns, while skipping it where it can."""

from __future__ import annotations

import ftfy
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.caption_fix import fix_caption, ftfy_would_change


def test_every_bmp_code_point_matches_ftfy() -> None:
    wrong = []
    for cp in range(0x10000):
        c = chr(cp)
        for text in (f"a {c} b", f"{c}{c}", f"“{c}” it’s"):
            if fix_caption(text) != ftfy.fix_text(text):
                wrong.append((hex(cp), text))
    assert wrong == []


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=40))
def test_random_text_matches_ftfy(text: str) -> None:
    assert fix_caption(text) == ftfy.fix_text(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF)
               | st.sampled_from("“”‘’—–…€™"), max_size=30))
def test_latin_and_windows_1252_text_matches_ftfy(text: str) -> None:
    # the range where mojibake lives: Latin-1, Latin Extended, cp1252's punctuation
    assert fix_caption(text) == ftfy.fix_text(text)


def test_known_repairs_and_skips() -> None:
    assert fix_caption("cafÃ© crÃ¨me") == "café crème"  # mojibake: ftfy runs
    assert fix_caption("“quoted” it’s") == "\"quoted\" it's"  # quotes only: fast path
    assert fix_caption("ﬁne") == "fine"  # ligature
    assert fix_caption("ＡＢＣ") == "ABC"  # full width
    assert fix_caption("a &amp; b") == "a & b"
    assert fix_caption("e\u0301") == "é"  # NFC
    for unchanged in ("café crème brûlée", "東京の夜", "½ €", "plain ascii"):
        assert not ftfy_would_change(unchanged)
        assert fix_caption(unchanged) == unchanged

