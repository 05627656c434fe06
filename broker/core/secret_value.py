"""A wrapper that keeps secret material out of reprs, logs and exceptions."""

from __future__ import annotations

from typing import Final

_MASK: Final = "***"


class SecretValue:
    """Holds one secret string. ``str()``/``repr()``/f-strings show only a mask; the
    value is reachable only through :meth:`reveal`, called where it is written to its
    destination (the per-pod Kubernetes Secret)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"SecretValue({_MASK})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretValue) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("SecretValue cannot be pickled")
