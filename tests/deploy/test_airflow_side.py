"""The documented Airflow chart values agree with podbroker (token audience and path, the
connection, the broker Service), and a worker's projected token is accepted by a
TokenReview the broker makes with the chart's RBAC, for that audience only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from airflow_plugin.settings import DEFAULT_TOKEN_FILE, settings_from_connection
from tests.deploy.conftest import CHART, REPO_ROOT, Helm, Release, find

AIRFLOW_VALUES = REPO_ROOT / "deploy" / "manifests" / "airflow-chart-values.yaml"
WORKER_RBAC = REPO_ROOT / "deploy" / "manifests" / "airflow-worker-rbac.yaml"


def _airflow_values() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(AIRFLOW_VALUES.read_text())
    return loaded


def test_workers_triggerer_and_api_server_get_the_podbroker_token() -> None:
    values = _airflow_values()
    chart_defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for component in ("workers", "triggerer", "apiServer"):
        (volume,) = values[component]["extraVolumes"]
        (mount,) = values[component]["extraVolumeMounts"]
        assert mount["name"] == volume["name"] and mount["readOnly"] is True
        token_sources = [s for s in volume["projected"]["sources"] if "serviceAccountToken" in s]
        (token,) = token_sources
        assert token["serviceAccountToken"]["audience"] == chart_defaults["tokenAudience"]
        assert token["serviceAccountToken"]["expirationSeconds"] <= 3600
        token_path = Path(mount["mountPath"]) / token["serviceAccountToken"]["path"]
        assert token_path == DEFAULT_TOKEN_FILE
    assert values["allowPodLaunching"] is False
    # The API server's own identity reads the report and launches nothing.
    api_server = "system:serviceaccount:airflow:airflow-api-server"
    assert api_server in chart_defaults["reportReaders"]
    assert api_server not in [c["identity"] for c in chart_defaults["callers"]]


def test_connection_env_points_at_the_chart_service(helm: Helm, tmp_path: Path) -> None:
    values = _airflow_values()
    (conn,) = [e for e in values["env"] if e["name"] == "AIRFLOW_CONN_PODBROKER_DEFAULT"]
    fields = json.loads(conn["value"])
    assert fields["conn_type"] == "podbroker"
    settings = settings_from_connection(
        host=fields["host"], port=fields["port"], password=None, extra=fields["extra"]
    )
    assert settings.auth_method == "service_account_token"
    assert settings.token_file == DEFAULT_TOKEN_FILE
    assert settings.verify == "/var/run/secrets/podbroker/ca.crt"
    docs = helm.render("podbroker", "podbroker", {}, tmp_path)
    (service,) = find(docs, "Service")
    expected = (
        f"https://{service['metadata']['name']}.{service['metadata']['namespace']}.svc:"
        f"{service['spec']['ports'][0]['port']}"
    )
    assert settings.base_url == expected


@pytest.mark.stack
def test_broker_can_review_a_worker_token_for_its_audience_only(
    helm: Helm, release: Release, tmp_path: Path
) -> None:
    docs = helm.render("pb", release.namespace, release.values(), tmp_path)
    release.apply([d for d in docs if d["kind"] in {"ServiceAccount", "ClusterRole",
                                                     "ClusterRoleBinding"}])  # fmt: skip
    workers = [d for d in yaml.safe_load_all(WORKER_RBAC.read_text()) if d]
    for doc in workers:
        doc["metadata"]["namespace"] = release.airflow
        for subject in doc.get("subjects", []):
            subject["namespace"] = release.airflow
    release.apply(workers)
    # A worker pod with the documented volume is valid for the API server.
    volume = _airflow_values()["workers"]["extraVolumes"][0]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "worker", "namespace": release.airflow},
        "spec": {
            "serviceAccountName": "airflow-worker",
            "containers": [{"name": "worker", "image": "apache/airflow:3.3.2",
                            "volumeMounts": _airflow_values()["workers"]["extraVolumeMounts"]}],
            "volumes": [volume],
        },
    }  # fmt: skip
    dry_run = release.kube.kubectl(
        "apply", "--dry-run=server", "-f", "-", input_text=yaml.safe_dump(pod)
    )
    assert dry_run.returncode == 0, dry_run.stderr

    broker_token = release.kube.mint_token(release.namespace, "podbroker")
    good = release.kube.mint_token(release.airflow, "airflow-worker", audiences=["podbroker"])
    wrong_audience = release.kube.mint_token(release.airflow, "airflow-worker")
    with release.client_as(broker_token, tmp_path, "broker") as api:
        auth = client.AuthenticationV1Api(api)

        def review(token: str) -> client.V1TokenReviewStatus:
            body = client.V1TokenReview(
                spec=client.V1TokenReviewSpec(token=token, audiences=["podbroker"])
            )
            status: client.V1TokenReviewStatus = auth.create_token_review(body).status
            return status

        accepted = review(good)
        assert accepted.authenticated is True
        assert accepted.user.username == f"system:serviceaccount:{release.airflow}:airflow-worker"
        assert review(wrong_audience).authenticated is not True
