"""A server TLS context that picks up a rotated certificate without a restart.

uvicorn loads the certificate once. Kubernetes updates a mounted Secret in place
(cert-manager renews it well before expiry), so the broker checks the two files at most
once per ``check_interval`` seconds, during a TLS handshake, and when they changed hands
that handshake and every later one a freshly loaded context. A half-written pair (new
certificate, old key) fails to load: the old context stays and the next handshake retries.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("podbroker.tls")

_Signature = tuple[tuple[int, int, int], ...]


def _signature(*paths: Path) -> _Signature:
    """(inode, size, mtime) of each file, following symlinks: a Secret volume swaps its
    ``..data`` link, which changes the inode even when the mtime would not."""
    out = []
    for path in paths:
        st = os.stat(path)
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class ReloadingTLSContext:
    """Hands uvicorn ``context``: its SNI callback (run on every ClientHello) swaps in the
    newest certificate. Reads only the two files it was given."""

    def __init__(
        self,
        cert_file: Path,
        key_file: Path,
        *,
        check_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.check_interval = check_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._checked_at = clock()
        self._loaded_signature = _signature(cert_file, key_file)
        self._current = self._build()
        # The context the listener is created with: the first one, plus the callback.
        self.context = self._build()
        self.context.sni_callback = self._on_client_hello
        self.reloads = 0

    def _build(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context

    def current(self) -> ssl.SSLContext:
        """The context for a handshake starting now, reloading first if the files moved."""
        now = self._clock()
        with self._lock:
            if now - self._checked_at < self.check_interval:
                return self._current
            self._checked_at = now
            try:
                signature = _signature(self.cert_file, self.key_file)
                if signature != self._loaded_signature:
                    self._current = self._build()
                    self._loaded_signature = signature
                    self.reloads += 1
                    log.info("TLS certificate reloaded from %s", self.cert_file)
            except (OSError, ssl.SSLError) as exc:
                # Mid-rotation (key and certificate do not match yet) or a missing file:
                # keep serving the previous certificate; retried on a later handshake.
                log.warning("TLS certificate not reloaded (%s); keeping the previous one", exc)
            return self._current

    def _on_client_hello(
        self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        fresh = self.current()
        if fresh is not self.context:
            ssl_object.context = fresh
