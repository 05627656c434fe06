"""Who is calling, and may they launch for this DAG? Kubernetes ServiceAccount tokens
are checked by TokenReview with the broker's own audience; static dev tokens by their
SHA-256 digest.

TokenReview answers are cached, keyed by the token's digest (never the token), in
bounded LRU caches: an accepted token no longer than ``review_cache_seconds`` nor past
its own ``exp``; a rejected one for ``rejected_cache_seconds``, so a flood of bad tokens
does not become a flood of TokenReviews. TokenReview calls are also capped per second
(a token bucket); over the cap the caller gets a retryable 503, never a 401, since its
token may well be valid."""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, Generic, TypeVar

from broker.core.models import Caller
from broker.errors import AuthenticationError, DeniedError, KubernetesUnavailableError
from broker.service.ports import TokenReviewer
from broker.settings import AuthSettings

CACHE_MAX_ENTRIES: Final = 10_000
"""Per cache (accepted, rejected); the least recently used entry goes first."""

_V = TypeVar("_V")


class ExpiringLru(Generic[_V]):
    """A bounded LRU map whose entries carry their own deadline (monotonic seconds).
    Not thread-safe: the caller holds a lock."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, _V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> _V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: str, until: float, value: _V) -> None:
        self._entries[key] = (until, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class TokenBucket:
    """``rate`` takes per second on average, at most ``burst`` at once. Not thread-safe."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last: float | None = None

    def take(self, now: float) -> float:
        """Take one: 0.0 when granted, else the seconds until one is available."""
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


def unverified_expiry(token: str) -> float | None:
    """The ``exp`` claim (Unix seconds) of a JWT's payload, read WITHOUT checking the
    signature. Only ever used to shorten how long an answer of TokenReview (the
    authority) is cached; None when the token is not a JWT or has no numeric ``exp``."""
    parts = token.split(".")
    if len(parts) != 3 or len(parts[1]) > 8192:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        return None
    return float(exp)


class Authenticator:
    def __init__(
        self,
        settings: AuthSettings,
        kube: TokenReviewer | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.kube = kube
        self._clock = clock
        self._wall_clock = wall_clock
        self._accepted: ExpiringLru[Caller] = ExpiringLru(CACHE_MAX_ENTRIES)
        self._rejected: ExpiringLru[str] = ExpiringLru(CACHE_MAX_ENTRIES)
        rate = settings.token_reviews_per_second
        self._reviews = TokenBucket(rate, burst=max(1.0, rate))
        self._lock = threading.Lock()

    def authenticate(self, authorization: str | None) -> Caller:
        """Turn an ``Authorization`` header into a Caller, or raise AuthenticationError
        (KubernetesUnavailableError, a 503, when TokenReview cannot be asked now)."""
        if not authorization or not authorization.lower().startswith("bearer "):
            raise AuthenticationError("missing bearer token (Authorization: Bearer <token>)")
        token = authorization[7:].strip()
        if not token:
            raise AuthenticationError("empty bearer token")
        digest = hashlib.sha256(token.encode()).hexdigest()
        for static in self.settings.static_tokens:
            if hmac.compare_digest(static.sha256, digest):
                return Caller(
                    identity=f"static:{static.name}", allowed_dag_globs=tuple(static.dag_ids)
                )
        if self.kube is None:
            raise AuthenticationError("token not recognised")
        now = self._clock()
        with self._lock:
            cached = self._accepted.get(digest, now)
            rejected = None if cached else self._rejected.get(digest, now)
            wait = 0.0 if cached or rejected else self._reviews.take(now)
        if cached:
            return cached
        if rejected:
            raise AuthenticationError(rejected)
        if wait:
            raise KubernetesUnavailableError(
                "too many token reviews at once "
                f"(over {self.settings.token_reviews_per_second:g}/s); retry shortly",
                retry_after=max(1, math.ceil(wait)),
            )
        reviewed = self.kube.token_review(token, self.settings.token_audience)
        if reviewed is None:
            reason = (
                f"token not authenticated by the API server for audience "
                f"{self.settings.token_audience!r}"
            )
            with self._lock:
                self._rejected.put(digest, now + self.settings.rejected_cache_seconds, reason)
            raise AuthenticationError(reason)
        username = reviewed.username
        globs: list[str] = []
        for rule in self.settings.callers:
            if fnmatch.fnmatchcase(username, rule.identity):
                globs.extend(rule.dag_ids)
        caller = Caller(
            identity=username,
            allowed_dag_globs=tuple(globs),
            bound_pod=reviewed.pod_name,
            bound_pod_uid=reviewed.pod_uid,
        )
        ttl = self.settings.review_cache_seconds
        expiry = unverified_expiry(token)
        if expiry is not None:
            ttl = min(ttl, expiry - self._wall_clock())
        if ttl > 0:
            with self._lock:
                self._accepted.put(digest, now + ttl, caller)
        return caller


def authorize_dag(caller: Caller, dag_id: str) -> None:
    """Raise DeniedError unless ``caller`` may launch for ``dag_id``."""
    if not any(fnmatch.fnmatchcase(dag_id, glob) for glob in caller.allowed_dag_globs):
        raise DeniedError(f"caller {caller.identity} may not launch tasks for DAG {dag_id!r}")
