"""The typed part of the chart's ``values.schema.json``, generated from the broker's own
settings model, so a wrong pod template or ``config`` key fails at ``helm install`` instead
of when the broker starts.

``podTemplates`` is ``BrokerSettings.pod_templates`` (name -> PodTemplate) and ``config``
is any part of ``BrokerSettings`` (merged over the keys the chart generates). The rest of
the schema is written by hand; this module replaces only those two properties and the
``definitions`` they refer to.

    python -m podbroker_devstack.chart_schema          # rewrite the chart's schema
    python -m podbroker_devstack.chart_schema --check  # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from broker.settings import BrokerSettings

CHART_SCHEMA = Path(__file__).resolve().parents[2] / "helm" / "podbroker" / "values.schema.json"
_GENERATED_NOTE = (
    "Generated from broker/settings.py by `python -m podbroker_devstack.chart_schema`; "
    "do not edit by hand."
)


def _tidy(node: Any) -> Any:
    """pydantic's JSON schema made draft-07 friendly and small: refs point at
    ``#/definitions``, no titles, no ``format: path`` (validators reject unknown formats
    in some modes, and a path is just a string to Helm)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "title" and isinstance(value, str):
                continue
            if key == "format" and value == "path":
                continue
            if key == "$ref" and isinstance(value, str):
                out[key] = value.replace("#/$defs/", "#/definitions/")
                continue
            out[key] = _tidy(value)
        return out
    if isinstance(node, list):
        return [_tidy(item) for item in node]
    return node


def settings_schema() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(podTemplates property, config property, definitions) from BrokerSettings."""
    schema = _tidy(BrokerSettings.model_json_schema())
    definitions: dict[str, Any] = schema.pop("$defs")
    definitions["BrokerSettings"] = {
        "description": "Raw config.yaml keys (broker/settings.py BrokerSettings), merged over "
        "the ones the chart generates. " + _GENERATED_NOTE,
        **schema,
    }
    pod_templates = {
        "description": "Pod templates offered to DAG authors (name -> PodTemplate, "
        "broker/core/plan.py). " + _GENERATED_NOTE,
        **schema["properties"]["pod_templates"],
    }
    config = {"$ref": "#/definitions/BrokerSettings"}
    return pod_templates, config, definitions


def generate(current: dict[str, Any]) -> dict[str, Any]:
    """``current`` (the committed schema) with its generated parts replaced."""
    pod_templates, config, definitions = settings_schema()
    out = dict(current)
    properties = dict(out["properties"])
    properties["podTemplates"] = pod_templates
    properties["config"] = config
    out["properties"] = properties
    out["definitions"] = definitions
    return out


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the schema is stale")
    parser.add_argument("--schema", type=Path, default=CHART_SCHEMA)
    args = parser.parse_args(argv)
    committed = args.schema.read_text()
    wanted = render(generate(json.loads(committed)))
    if committed == wanted:
        return 0
    if args.check:
        print(f"{args.schema} is stale: run python -m podbroker_devstack.chart_schema")
        return 1
    args.schema.write_text(wanted)
    print(f"wrote {args.schema}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
