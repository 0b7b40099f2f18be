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



def _mojibake(text: str, codec: str) -> str:
    """UTF-8 bytes read as a single-byte code page: what ftfy's fix_encoding undoes."""
    return text.encode("utf-8").decode(codec, errors="replace")


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF)
               | st.sampled_from("“”‘’—–…€™&<\n東京ﬁＡ"), max_size=30),
       st.sampled_from(["latin-1", "cp1252", "cp1251", "iso-8859-2", "mac_roman", "cp437"]))
def test_mojibake_matches_ftfy(text: str, codec: str) -> None:
    broken = _mojibake(text, codec)
    assert fix_caption(broken) == ftfy.fix_text(broken)


def test_mojibake_runs_only_the_encoding_fixer(monkeypatch) -> None:
    import pipeline.caption_fix as cf

    calls = []
    monkeypatch.setattr(cf.ftfy, "fix_text", lambda t, *a, **k: calls.append(t) or t)
    assert fix_caption("cafÃ© crÃ¨me") == "café crème"
    assert fix_caption("â€œquotedâ€\x9d and itâ€™s") == "\"quoted\" and it's"
    assert calls == []  # decoded by fix_encoding, finished by the fast path
    fix_caption("cafÃ© &amp; crÃ¨me")  # a '&': unescaping may interleave, ftfy runs in full
    assert calls == ["cafÃ© &amp; crÃ¨me"]
