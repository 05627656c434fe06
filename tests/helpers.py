"""Small helpers shared by the real-stack tests."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(check: Callable[[], bool], timeout: float = 30.0, interval: float = 0.2) -> bool:
    """Poll ``check`` until it is true; False if ``timeout`` passes first. Used for what
    controllers do asynchronously (garbage collection, pod phases), never to time things."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return False
