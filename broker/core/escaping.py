"""Neutralise untrusted text (DAG, run and task ids, secret names, caller identities)
before it goes into line-oriented output: terminal tables, plain-text logs and CSV
cells opened by spreadsheets. Pure functions; the renderers and log formatters call
them at output time, so stored records keep the exact text."""

from __future__ import annotations

import re
import unicodedata
from typing import Final

# Control (Cc), format (Cf: bidi overrides, zero-width) and line/paragraph separators.
_INVISIBLE_CATEGORIES: Final = frozenset({"Cc", "Cf", "Zl", "Zp"})
_FORMULA_STARTS: Final = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER: Final = re.compile(r"[-+]?[0-9]+(?:\.[0-9]+)?")


def _escape_char(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def visible(text: str) -> str:
    """``text`` with every control, format and line-separator character written out
    visibly (ESC -> ``\\x1b``, newline -> ``\\x0a``, U+202E -> ``\\u202e``), so it can
    neither start a forged line nor drive the terminal. Ordinary text is unchanged."""
    if text.isprintable():
        return text
    return "".join(
        _escape_char(c) if unicodedata.category(c) in _INVISIBLE_CATEGORIES else c for c in text
    )


def csv_cell(value: object) -> object:
    """A CSV cell that a spreadsheet cannot evaluate: text starting with ``= + - @``,
    tab or CR gets a leading ``'`` (OWASP's advice); control characters are written
    out visibly. Numbers, and text that is just a number or ``-``, stay as they are."""
    if not isinstance(value, str):
        return value
    text = visible(value)
    if text.startswith(_FORMULA_STARTS) and text != "-" and not _PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text
