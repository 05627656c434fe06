"""The Authenticator's caches and TokenReview cap (issue 12, item 8), with a fake
TokenReviewer and a hand-driven clock."""

from __future__ import annotations

import base64
import json

import pytest

from broker.core.objects import ReviewedToken
from broker.errors import AuthenticationError, KubernetesUnavailableError, status_for
from broker.service.auth import Authenticator, ExpiringLru, TokenBucket, unverified_expiry
from broker.settings import AuthSettings, CallerRule

WALL_START = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.elapsed = 0.0

    def monotonic(self) -> float:
        return 100.0 + self.elapsed

    def wall(self) -> float:
        return WALL_START + self.elapsed


class Reviewer:
    """Accepts tokens in ``valid``; counts every TokenReview."""

    def __init__(self) -> None:
        self.valid: set[str] = set()
        self.calls = 0

    def token_review(self, token: str, audience: str) -> ReviewedToken | None:
        self.calls += 1
        return ReviewedToken(username="system:serviceaccount:a:w") if token in self.valid else None


def jwt_with(payload: object) -> str:
    def part(data: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part(payload)}.c2lnbmF0dXJl"


def make(**settings: float) -> tuple[Authenticator, Reviewer, Clock]:
    reviewer, clock = Reviewer(), Clock()
    auth = Authenticator(
        AuthSettings(callers=[CallerRule(identity="system:serviceaccount:a:*")], **settings),
        reviewer,
        clock=clock.monotonic,
        wall_clock=clock.wall,
    )
    return auth, reviewer, clock


def test_accepted_token_is_cached_no_longer_than_its_own_expiry() -> None:
    auth, reviewer, clock = make(review_cache_seconds=30)
    token = jwt_with({"sub": "x", "exp": WALL_START + 5})
    reviewer.valid.add(token)
    auth.authenticate(f"Bearer {token}")
    clock.elapsed = 4
    auth.authenticate(f"Bearer {token}")
    assert reviewer.calls == 1
    clock.elapsed = 5.5  # past exp: TokenReview decides again (here: it has expired)
    reviewer.valid.clear()
    with pytest.raises(AuthenticationError):
        auth.authenticate(f"Bearer {token}")
    assert reviewer.calls == 2


def test_accepted_token_is_cached_no_longer_than_the_setting() -> None:
    auth, reviewer, clock = make(review_cache_seconds=10)
    token = jwt_with({"exp": WALL_START + 3600})
    reviewer.valid.add(token)
    auth.authenticate(f"Bearer {token}")
    clock.elapsed = 9
    auth.authenticate(f"Bearer {token}")
    assert reviewer.calls == 1
    clock.elapsed = 11
    auth.authenticate(f"Bearer {token}")
    assert reviewer.calls == 2


def test_a_token_already_past_its_exp_is_never_cached() -> None:
    auth, reviewer, _ = make()
    token = jwt_with({"exp": WALL_START - 1})
    reviewer.valid.add(token)  # TokenReview is the authority; the cache only shortens
    auth.authenticate(f"Bearer {token}")
    auth.authenticate(f"Bearer {token}")
    assert reviewer.calls == 2


def test_rejected_token_is_cached_briefly() -> None:
    auth, reviewer, clock = make(rejected_cache_seconds=5)
    for _ in range(20):
        with pytest.raises(AuthenticationError, match="not authenticated"):
            auth.authenticate("Bearer bad-token")
    assert reviewer.calls == 1
    clock.elapsed = 6
    reviewer.valid.add("bad-token")  # became valid: asked again once the entry expires
    assert auth.authenticate("Bearer bad-token").identity == "system:serviceaccount:a:w"
    assert reviewer.calls == 2


def test_token_reviews_are_capped_with_a_retryable_503_never_a_401() -> None:
    auth, reviewer, clock = make(token_reviews_per_second=2)
    reviewer.valid.add("good")
    for i in range(2):
        with pytest.raises(AuthenticationError):
            auth.authenticate(f"Bearer bad-{i}")
    with pytest.raises(KubernetesUnavailableError) as capped:
        auth.authenticate("Bearer good")
    assert status_for(capped.value) == 503
    assert capped.value.retry_after >= 1
    assert reviewer.calls == 2
    clock.elapsed = 0.5  # one review's worth refilled
    assert auth.authenticate("Bearer good").identity == "system:serviceaccount:a:w"
    # cached answers need no review: they are never capped
    assert auth.authenticate("Bearer good").identity == "system:serviceaccount:a:w"
    with pytest.raises(AuthenticationError):
        auth.authenticate("Bearer bad-0")
    assert reviewer.calls == 3


def test_static_tokens_need_no_review_and_are_never_capped() -> None:
    from broker.settings import StaticToken

    reviewer = Reviewer()
    auth = Authenticator(
        AuthSettings(
            static_tokens=[StaticToken(name="dev", sha256=StaticToken.digest("t"))],
            token_reviews_per_second=0.001,
        ),
        reviewer,
    )
    for _ in range(5):
        assert auth.authenticate("Bearer t").identity == "static:dev"
    assert reviewer.calls == 0


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        "a.b",
        "a.!!!.c",
        jwt_with(["exp"]),
        jwt_with({"exp": "soon"}),
        jwt_with({"exp": True}),
        jwt_with({"sub": "x"}),
        "a." + "W" * 10_000 + ".c",
        "a." + base64.urlsafe_b64encode(b"[" * 3000).decode() + ".c",
    ],
)
def test_unverified_expiry_ignores_anything_but_a_numeric_exp(token: str) -> None:
    assert unverified_expiry(token) is None


def test_unverified_expiry_reads_exp() -> None:
    assert unverified_expiry(jwt_with({"exp": 1234})) == 1234.0


def test_expiring_lru_is_bounded_and_drops_the_least_recently_used() -> None:
    lru: ExpiringLru[int] = ExpiringLru(3)
    for i in range(3):
        lru.put(str(i), 10.0, i)
    assert lru.get("0", 0.0) == 0  # now most recent
    lru.put("3", 10.0, 3)
    assert len(lru) == 3
    assert lru.get("1", 0.0) is None
    assert lru.get("0", 0.0) == 0
    assert lru.get("0", 10.0) is None  # expired
    assert len(lru) == 2


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=4, burst=4)
    assert [bucket.take(0.0) for _ in range(4)] == [0.0] * 4
    assert bucket.take(0.0) == pytest.approx(0.25)
    assert bucket.take(0.25) == 0.0
