"""Sentence segmentation for attribution: text -> sentence start offsets.

Segmented once at ingest and stored with the document, so that a retrieved entry can
point at the sentence it came from. The rules are deliberately simple and total (every
character belongs to exactly one sentence, sentences are contiguous, whitespace after a
sentence belongs to it) because attribution needs a stable partition more than it needs
linguistic perfection:

1. paragraphs end at blank lines;
2. inside a paragraph, a sentence ends after `.`, `!` or `?` (plus closing quotes or
   brackets) followed by whitespace and a character that is not lower-case;
3. a piece still longer than `max_chars` (code, tables) is cut at line ends, packing
   whole lines up to `max_chars`, and a single over-long line is cut hard.
"""

from __future__ import annotations

import bisect
import re

_PARAGRAPH_END = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*\s+(?=[^\sa-z])")


def segment(text: str, max_chars: int = 400) -> list[int]:
    """Start offsets (characters) of the sentences of `text`; `[0]` for any non-empty text."""
    assert max_chars > 0
    if not text:
        return []
    starts: list[int] = []
    for p_start, p_end in _spans(text, _PARAGRAPH_END, 0, len(text)):
        for s_start, s_end in _spans(text, _SENTENCE_END, p_start, p_end):
            starts.extend(_cut_long(text, s_start, s_end, max_chars))
    return starts


def sentence_of(starts: list[int], char_offset: int) -> int:
    """Index of the sentence holding `char_offset`, given `segment`'s start offsets."""
    return max(bisect.bisect_right(starts, char_offset) - 1, 0)


def _spans(text: str, pattern: re.Pattern[str], start: int, end: int) -> list[tuple[int, int]]:
    spans, cur = [], start
    for m in pattern.finditer(text, start, end):
        if m.end() < end:
            spans.append((cur, m.end()))
            cur = m.end()
    spans.append((cur, end))
    return spans


def _cut_long(text: str, start: int, end: int, max_chars: int) -> list[int]:
    if end - start <= max_chars:
        return [start]
    starts, cur = [start], start
    while end - cur > max_chars:
        nl = text.rfind("\n", cur + 1, cur + max_chars)
        cut = nl + 1 if nl > cur else cur + max_chars
        starts.append(cut)
        cur = cut
    return starts
