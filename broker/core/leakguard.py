"""The leak guard of the log stream: every value issued to a launch, and its common
encodings, replaced by a mask in the bytes relayed to the caller, even when a value is
split across chunks. Pure: the service feeds chunks and records what was exposed."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from typing import Final
from urllib.parse import quote, quote_plus

from broker.core.secret_value import SecretValue

MASK: Final = b"***"
MIN_VALUE_LENGTH: Final = 4
"""Shorter values are not masked: masking every "1" or "on" would garble the log and
protects nothing a guess would not find."""


def encodings(value: str) -> set[bytes]:
    """The forms of ``value`` a task is likely to print: as is, base64 (standard and
    URL-safe, with or without padding) and URL-encoded."""
    if len(value) < MIN_VALUE_LENGTH:
        return set()
    raw = value.encode()
    b64 = base64.b64encode(raw)
    b64url = base64.urlsafe_b64encode(raw)
    return {
        raw,
        b64,
        b64.rstrip(b"="),
        b64url,
        b64url.rstrip(b"="),
        quote(value, safe="").encode(),
        quote_plus(value, safe="").encode(),
    }


class LogMasker:
    """A streaming matcher over ``values`` (secret name -> its values). :meth:`feed`
    returns what may be relayed now; bytes that could be the start of a value are held
    back (at most the longest pattern's length) until the next chunk or :meth:`flush`.
    ``exposed`` names the secrets seen so far; the values themselves are never kept
    beyond this object, which lives as long as one log stream."""

    def __init__(self, values: Mapping[str, Iterable[SecretValue]]) -> None:
        owner: dict[bytes, str] = {}
        for name, items in values.items():
            for item in items:
                for form in encodings(item.reveal()):
                    owner.setdefault(form, name)
        self._owner = owner
        # Longest first: at one position the longest value wins over its own prefix.
        patterns = sorted(owner, key=len, reverse=True)
        self._regex = re.compile(b"|".join(re.escape(p) for p in patterns)) if patterns else None
        self._prefixes = {p[:i] for p in patterns for i in range(1, len(p))}
        self._longest = len(patterns[0]) if patterns else 0
        self._held = b""
        self.exposed: set[str] = set()

    @property
    def active(self) -> bool:
        return self._regex is not None

    def __repr__(self) -> str:
        return f"LogMasker({len(self._owner)} patterns)"

    def _held_length(self, data: bytes) -> int:
        """The longest end of ``data`` that is the start of some value (not all of it)."""
        for size in range(min(self._longest - 1, len(data)), 0, -1):
            if data[-size:] in self._prefixes:
                return size
        return 0

    def feed(self, chunk: bytes, *, final: bool = False) -> bytes:
        data = self._held + chunk
        self._held = b""
        if self._regex is None:
            return data
        hold_from = len(data) if final else len(data) - self._held_length(data)
        out: list[bytes] = []
        pos = 0
        for match in self._regex.finditer(data):
            if match.start() >= hold_from:
                break
            out.append(data[pos : match.start()])
            out.append(MASK)
            self.exposed.add(self._owner[match.group()])
            pos = match.end()
        keep = max(pos, hold_from)
        out.append(data[pos:keep])
        self._held = data[keep:]
        return b"".join(out)

    def flush(self) -> bytes:
        """The held-back end, masked (the stream ended)."""
        return self.feed(b"", final=True)
