"""Who is calling, and may they launch for this DAG? Kubernetes ServiceAccount tokens
are checked by TokenReview with the broker's own audience; static dev tokens by their
SHA-256 digest. Results are cached briefly (keyed by the token's digest, never the
token) so a launch does not pay a TokenReview every time."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import threading
import time

from broker.core.models import Caller
from broker.errors import AuthenticationError, DeniedError
from broker.service.ports import TokenReviewer
from broker.settings import AuthSettings


class Authenticator:
    def __init__(self, settings: AuthSettings, kube: TokenReviewer | None) -> None:
        self.settings = settings
        self.kube = kube
        self._cache: dict[str, tuple[float, Caller]] = {}
        self._lock = threading.Lock()

    def authenticate(self, authorization: str | None) -> Caller:
        """Turn an ``Authorization`` header into a Caller, or raise AuthenticationError."""
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
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(digest)
        if cached and cached[0] > now:
            return cached[1]
        if self.kube is None:
            raise AuthenticationError("token not recognised")
        reviewed = self.kube.token_review(token, self.settings.token_audience)
        if reviewed is None:
            raise AuthenticationError(
                f"token not authenticated by the API server for audience "
                f"{self.settings.token_audience!r}"
            )
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
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now + self.settings.review_cache_seconds, caller)
        return caller


def authorize_dag(caller: Caller, dag_id: str) -> None:
    """Raise DeniedError unless ``caller`` may launch for ``dag_id``."""
    if not any(fnmatch.fnmatchcase(dag_id, glob) for glob in caller.allowed_dag_globs):
        raise DeniedError(f"caller {caller.identity} may not launch tasks for DAG {dag_id!r}")
