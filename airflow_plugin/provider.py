"""Provider metadata read by Airflow's ProvidersManager through the
``apache_airflow_provider`` entry point: the ``podbroker`` connection type and the fields
its connection form shows. Declarative (``conn-fields`` / ``ui-field-behaviour``), so the
UI needs no hook import and no wtforms."""

from __future__ import annotations

from typing import Any

from airflow_plugin.settings import (
    CONN_TYPE,
    DEFAULT_TOKEN_FILE,
    EXTRA_AUTH_METHOD,
    EXTRA_CA_BUNDLE,
    EXTRA_NAMESPACE,
    EXTRA_TIMEOUT,
    EXTRA_TOKEN_FILE,
)


def get_provider_info() -> dict[str, Any]:
    """What Airflow needs to list the provider and render the connection form."""
    return {
        "package-name": "podbroker",
        "name": "Pod Broker",
        "description": "Launch Kubernetes pods whose secrets are brokered from Vault/OpenBao; "
        "Airflow workers never hold the secret values.",
        "versions": ["0.1.0"],
        "connection-types": [
            {
                "connection-type": CONN_TYPE,
                "hook-class-name": "airflow_plugin.hook.BrokerHook",
                "hook-name": "Pod Broker",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "login", "port", "extra"],
                    "relabeling": {
                        "host": "Broker URL",
                        "password": "Static token (development only)",
                    },
                    "placeholders": {
                        "host": "https://podbroker.podbroker.svc:8443",
                        "password": "empty in a cluster: the ServiceAccount token file is used",
                    },
                },
                "conn-fields": {
                    EXTRA_AUTH_METHOD: {
                        "label": "Authentication",
                        "description": "service_account_token: read the projected token file "
                        "on every call (kubelet rotates it). static_token: send the password.",
                        "schema": {
                            "type": ["string", "null"],
                            "enum": ["service_account_token", "static_token", None],
                        },
                    },
                    EXTRA_TOKEN_FILE: {
                        "label": "ServiceAccount token file",
                        "description": "Projected token with the broker's audience.",
                        "schema": {"type": ["string", "null"], "default": str(DEFAULT_TOKEN_FILE)},
                    },
                    EXTRA_CA_BUNDLE: {
                        "label": "CA bundle",
                        "description": "PEM file that verifies the broker's TLS certificate "
                        "(empty: system trust store).",
                        "schema": {"type": ["string", "null"]},
                    },
                    EXTRA_NAMESPACE: {
                        "label": "Default namespace",
                        "description": "Namespace for pods when the operator names none "
                        "(empty: the broker's default).",
                        "schema": {"type": ["string", "null"]},
                    },
                    EXTRA_TIMEOUT: {
                        "label": "HTTP timeout (seconds)",
                        "schema": {"type": ["number", "null"], "minimum": 1, "default": 30},
                    },
                },
            }
        ],
    }
