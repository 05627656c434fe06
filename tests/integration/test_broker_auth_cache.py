"""Authentication cache on the real stack (issue 12, item 8): the broker caches a
TokenReview answer no longer than the token's own expiry, caches rejections briefly, and
caps TokenReview calls with a retryable 503. TokenReviews are counted from the broker's
own /metrics (``podbroker_kubernetes_call_seconds_count{verb="token_review"}``)."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from kubernetes import client

from podbroker_devstack.broker_env import TOKEN_AUDIENCE, BrokerHandle, start_broker
from podbroker_devstack.kube import ControlPlane
from podbroker_devstack.openbao import OpenBao
from podbroker_devstack.postgres import Postgres
from podbroker_devstack.sources import SourceTree

pytestmark = pytest.mark.stack

NO_SUCH_LAUNCH = "/v1/launches/" + "0" * 20
"""Authenticated callers get 404 here, others 401: a probe that changes nothing."""


def token_reviews(broker: BrokerHandle) -> float:
    text = httpx.get(f"{broker.url}/metrics", timeout=10, verify=broker.verify).text
    found = re.search(
        r'^podbroker_kubernetes_call_seconds_count\{verb="token_review"\} (\S+)$', text, re.M
    )
    return float(found.group(1)) if found else 0.0


def probe(broker: BrokerHandle, token: str) -> httpx.Response:
    return httpx.get(
        f"{broker.url}{NO_SUCH_LAUNCH}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
        verify=broker.verify,
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def short_lived_token(kube: ControlPlane, namespace: str, lifetime_seconds: int) -> str:
    """A real ServiceAccount token that expires in ``lifetime_seconds``. TokenRequest
    refuses lifetimes under 10 minutes, so this re-signs a minted token's claims with a
    shorter ``exp``, using the control plane's own service-account signing key."""
    core = client.CoreV1Api(kube.api_client())
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="caller"))
    )
    minted = kube.mint_token(namespace, "caller", audiences=[TOKEN_AUDIENCE])
    header, payload, _ = minted.split(".")
    claims: dict[str, Any] = json.loads(_unb64(payload))
    now = int(time.time())
    claims.update(iat=now - 1, nbf=now - 1, exp=now + lifetime_seconds)
    signing_input = f"{header}.{_b64(json.dumps(claims).encode())}"
    key = serialization.load_pem_private_key((kube.folder / "pki" / "sa.key").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}"


def test_an_accepted_token_is_not_cached_past_its_own_expiry(
    broker: BrokerHandle, kube: ControlPlane, namespace: str
) -> None:
    token = short_lived_token(kube, namespace, lifetime_seconds=4)
    before = token_reviews(broker)
    assert probe(broker, token).status_code == 404  # authenticated
    assert probe(broker, token).status_code == 404
    assert token_reviews(broker) - before == 1  # the second answer came from the cache
    expiry = json.loads(_unb64(token.split(".")[1]))["exp"]
    time.sleep(max(0.0, expiry - time.time()) + 0.5)
    # review_cache_seconds is 30 here: only the token's own exp ends the cached answer
    probe(broker, token)
    assert token_reviews(broker) - before == 2


def test_a_rejected_token_costs_one_token_review_not_one_per_request(
    broker: BrokerHandle,
) -> None:
    bogus = f"{_b64(b'{}')}.{_b64(json.dumps({'exp': time.time() + 600}).encode())}.x"
    before = token_reviews(broker)
    for _ in range(10):
        response = probe(broker, bogus)
        assert response.status_code == 401, response.text
    assert token_reviews(broker) - before == 1


def test_token_reviews_over_the_cap_get_a_retryable_503_never_a_401(
    tmp_path: Path,
    kube: ControlPlane,
    own_vault: OpenBao,
    postgres: Postgres,
    sources: SourceTree,
    unique: str,
    namespace: str,
) -> None:
    capped = start_broker(
        tmp_path / "broker",
        kube,
        own_vault,
        postgres,
        sources,
        task_namespace=f"cap-{unique}",
        extra_settings={"auth": {"token_reviews_per_second": 1}},
    )
    try:
        valid = kube.mint_token(namespace, "default", audiences=[TOKEN_AUDIENCE])
        answers = [probe(capped, f"bogus-{i}-{unique}") for i in range(8)]
        statuses = [a.status_code for a in answers]
        assert set(statuses) <= {401, 503}, statuses
        assert statuses.count(503) >= 5, statuses  # 1 review/s, burst 1, ~8 requests at once
        throttled = next(a for a in answers if a.status_code == 503)
        assert int(throttled.headers["Retry-After"]) >= 1
        assert throttled.json()["retryable"] is True
        # a valid token over the cap is told to retry, never refused
        assert probe(capped, valid).status_code in {404, 503}
        time.sleep(1.2)
        assert probe(capped, valid).status_code == 404
        # and once accepted it is served from the cache, whatever the cap
        assert all(probe(capped, valid).status_code == 404 for _ in range(5))
        # static tokens need no review at all
        assert probe(capped, capped.token).status_code == 404
    finally:
        capped.stop()
