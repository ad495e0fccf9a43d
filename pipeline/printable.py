"""Text from user data made safe to show: on a terminal, in a log, in an HTML page.

File names, captions, image ids, and values quoted in messages come from the user's files, and may carry
what a terminal or a browser acts on instead of showing: ANSI/escape sequences (set the window title,
recolour or hide text, make a hyperlink), other C0 and C1 control characters (a carriage return that
overwrites the line before it, a backspace, a newline inside a one-line message), and the bidirectional
controls that reorder what a reader sees ("Trojan Source": U+202A-U+202E, U+2066-U+2069, and the marks
U+200E, U+200F, U+061C), plus the Unicode line and paragraph separators. `printable` writes each of those
as a visible escape (`\\x1b`, `\\u202e`), so the text says what it holds and nothing acts on it; every
other character (accents, CJK, emoji and their joiners) is kept.

It is applied once, at each output boundary, never at the source (ids and captions stay as they are in the
index and the store): `stages._common.echo` (stdout), the one-line error of `run_stage`, the console log
handler and the progress bars (pipeline/progress.py), `kdpipe verify`'s chunk lines, and the HTML of
`kdpipe report` (`html_text`). `limit` caps what one line may quote: an error that echoes a value whose repr
is megabytes keeps its head (the key) and its tail (what to do), and says how much it left out.
"""

from __future__ import annotations

import html
import re

# C0 controls (tab and newline included: every output here is one line per record), DEL and C1 controls,
# the Arabic letter mark, LRM/RLM, the line/paragraph separators, the bidi embeddings/overrides and isolates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

MESSAGE_LIMIT = 1000  # characters of one error or log line; real ones are a few hundred


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, limit: int | None = None) -> str:
    """`text` with every control character and bidi control written as a visible escape; with `limit`, at
    most about that many characters: the middle of a longer text is replaced by a note of how much it held."""
    text = str(text)
    if limit is not None and len(text) > limit:
        head, tail = text[: limit * 2 // 3], text[len(text) - limit // 3 :]
        left_out = len(text) - len(head) - len(tail)
        return f"{_UNSAFE.sub(_escape, head)} ... [{left_out:,} characters left out] ... {_UNSAFE.sub(_escape, tail)}"
    return _UNSAFE.sub(_escape, text)


def html_text(text: object) -> str:
    """`text` for an HTML page, as element content or a quoted attribute value: `printable`, then escaped."""
    return html.escape(printable(text), quote=True)


__all__ = ["MESSAGE_LIMIT", "printable", "html_text"]
