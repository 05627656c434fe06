"""Provider metadata read by Airflow's ProvidersManager through the
``apache_airflow_provider`` entry point (schema: ``airflow/provider_info.schema.json``):
the integration, its operator, hook and trigger modules, the operator's extra link, the
``[podbroker]`` config section the plugin reads, and the ``podbroker``
connection type with the fields its form shows (declarative ``conn-fields`` /
``ui-field-behaviour``, so the UI needs no hook import and no wtforms).

The extra link (``airflow_plugin.links``) and the ``@task.broker`` decorator
(``airflow_plugin.decorators``) are listed only when their modules exist, found without
importing them; tests/unit/test_airflow_provider_info.py checks the listing against
what the package holds.

The UI plugin is not listed under ``plugins``: Airflow 3.3 loads provider-listed plugins
only with ``[core] lazy_discover_providers = False`` and then also loads the same plugin
from the ``airflow.plugins`` entry point (which the default, lazy, setting needs), so
it would be skipped as "already registered" and shown as a plugin import error."""

from __future__ import annotations

from importlib.util import find_spec
from typing import Any

from airflow_plugin.settings import (
    CONN_TYPE,
    DEFAULT_CONN_ID,
    DEFAULT_TOKEN_FILE,
    EXTRA_AUTH_METHOD,
    EXTRA_CA_BUNDLE,
    EXTRA_NAMESPACE,
    EXTRA_TIMEOUT,
    EXTRA_TOKEN_FILE,
)

INTEGRATION = "Pod Broker"
VERSION = "0.1.0"
EXTRA_LINK_CLASS = "airflow_plugin.links.BrokerLaunchLink"
TASK_DECORATOR = {"name": "broker", "class-name": "airflow_plugin.decorators.broker_task"}


def _module_exists(name: str) -> bool:
    try:
        return find_spec(name) is not None
    except ImportError:
        return False


def _optional_parts() -> dict[str, Any]:
    """The extra link and the task decorator, when this install has them."""
    parts: dict[str, Any] = {}
    if _module_exists(EXTRA_LINK_CLASS.rpartition(".")[0]):
        parts["extra-links"] = [EXTRA_LINK_CLASS]
    if _module_exists(TASK_DECORATOR["class-name"].rpartition(".")[0]):
        parts["task-decorators"] = [dict(TASK_DECORATOR)]
    return parts


def get_provider_info() -> dict[str, Any]:
    """What Airflow needs to list the provider, its parts and the connection form."""
    return {
        "package-name": "podbroker",
        "name": INTEGRATION,
        "description": "Launch Kubernetes pods whose secrets are brokered from Vault/OpenBao; "
        "Airflow workers never hold the secret values.",
        "versions": [VERSION],
        "integrations": [
            {
                "integration-name": INTEGRATION,
                "tags": ["software"],
            }
        ],
        "operators": [
            {"integration-name": INTEGRATION, "python-modules": ["airflow_plugin.operator"]}
        ],
        "hooks": [{"integration-name": INTEGRATION, "python-modules": ["airflow_plugin.hook"]}],
        "triggers": [
            {"integration-name": INTEGRATION, "python-modules": ["airflow_plugin.trigger"]}
        ],
        "config": {
            "podbroker": {
                "description": "Settings of the podbroker UI plugin (the operator takes its "
                "own ``conn_id`` argument).",
                "options": {
                    "conn_id": {
                        "description": "Connection the Secret usage and task-instance pages "
                        "use to reach the broker (the API server's own broker credential).",
                        "version_added": VERSION,
                        "type": "string",
                        "example": None,
                        "default": DEFAULT_CONN_ID,
                    }
                },
            }
        },
        **_optional_parts(),
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
