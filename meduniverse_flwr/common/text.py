"""Text from a node, made safe to show: on one line, short, and never read as markup by a log, a
plot or a report. ``validation`` quotes what it rejects with these; the reports and plots label
tasks with ``safe_label``.

- ``safe_label(text)``: a node-supplied string made safe for a log line or a matplotlib label.
- ``quote(value)``: any value as a short one-line repr, for reasons.
- ``one_line(text)``: non-printable characters escaped.
"""

from __future__ import annotations

import reprlib

# A quoted value in a reason: enough to recognise it, never a flood.
QUOTE_LENGTH = 40
_LABEL_ESCAPES = {"\\": "\\\\", "$": "\\$"}

_repr = reprlib.Repr()  # repr that cuts long strings, numbers and containers short before building them
_repr.maxstring = _repr.maxlong = _repr.maxother = QUOTE_LENGTH
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = _repr.maxfrozenset = 3


def quote(value: object) -> str:
    """``repr(value)`` on one line and at most ``QUOTE_LENGTH`` characters, for any value."""
    try:
        text = one_line(_repr.repr(value))
    except Exception:  # e.g. an int past Python's digit limit, or a repr that raises
        text = f"<{type(value).__name__}>"
    return text if len(text) <= QUOTE_LENGTH else text[: QUOTE_LENGTH - 3] + "..."


def safe_label(text: str) -> str:
    """``text`` from a node, safe for a log line and a matplotlib label.

    Non-printable characters (newlines, ANSI escapes, bidi overrides, lone surrogates) become
    their escape sequences; ``\\`` and ``$`` are backslash-escaped, so the result never starts
    mathtext (matplotlib shows ``\\$`` as ``$``) and the escaping cannot be forged.
    """
    return "".join(_LABEL_ESCAPES.get(ch, ch) if ch.isprintable() else _escape(ch) for ch in text)


def one_line(text: str) -> str:
    """``text`` with its non-printable characters escaped (newlines, ANSI codes, ...)."""
    return text if text.isprintable() else "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    return ch.encode("unicode_escape").decode("ascii")  # "\n" -> "\\n", "\x1b" -> "\\x1b"
