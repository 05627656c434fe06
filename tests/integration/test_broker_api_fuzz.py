"""Property-based fuzzing of the broker's own OpenAPI spec on the real stack, with every
check schemathesis has: no 5xx, status codes, media types, headers and bodies as
documented, invalid input refused, valid input accepted, authentication enforced, a
missing Authorization header refused with 401, 405 with a correct ``Allow`` for methods
the spec does not list; and never a secret value.

Two of schemathesis's phases run: coverage (boundary values, wrong types, missing
parameters and headers, unlisted methods: deterministic, sampled per scenario) and
fuzzing (hypothesis draws, valid and invalid requests alike)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from pydantic import ValidationError
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.generation.drivers import CoverageGenerator
from schemathesis.generation.feedback import FeedbackSources
from schemathesis.generation.overrides import Override
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi.schemas import OpenApiSchema

from broker.core.api_models import LaunchRequest
from podbroker_devstack.broker_env import BrokerHandle

pytestmark = pytest.mark.stack

COVERAGE_PER_SCENARIO = 3
"""Coverage cases sent per (operation, mode, scenario, parameter): spread evenly over
the scenario's cases (POST /v1/launches alone has about 2,000, 500 of them launches)."""
FUZZ_EXAMPLES_PER_OPERATION = 12


def is_launch_rule(case: schemathesis.Case, response: Any, failure: Any) -> bool:
    """A "valid data rejected" failure that is a launch's semantic 422: a body the
    broker's own request model accepts, refused by a rule no schema can state (a
    reserved label, an unsafe annotation, a secret named twice ...). A schema-valid body
    the model refuses is not excused: then schema and validation disagree."""
    if not (
        case.operation.label == "POST /v1/launches"
        and response.status_code == 422
        and isinstance(failure, RejectedPositiveData)
    ):
        return False
    try:
        # As FastAPI sees it: the JSON the client sent, decoded.
        LaunchRequest.model_validate(json.loads(json.dumps(case.body)))
    except ValidationError:
        return False
    return True


# Invalid data is rejected by the statuses schemathesis expects, and by 413 too: a body
# over limits.max_body_bytes is refused before it is read (the spec documents it).
CONFIG = """
[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]
"""


def load_schema(broker: BrokerHandle) -> OpenApiSchema:
    schema = schemathesis.openapi.from_url(
        f"{broker.url}/openapi.json", config=SchemathesisConfig.from_str(CONFIG)
    )
    token = broker.token

    # Generated cases carry the dev token, except the ones that test its absence.
    @schema.auth()
    class DevToken:
        def get(self, case: schemathesis.Case, context: Any) -> str:
            return token

        def set(self, case: schemathesis.Case, data: str, context: Any) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    return schema


def coverage_cases(schema: OpenApiSchema, operation: Any) -> Iterator[schemathesis.Case]:
    """The coverage phase's cases for ``operation`` (the generator the schemathesis
    runner and pytest plugin use), a few of each scenario, evenly spread."""
    generator = CoverageGenerator(
        operation=operation,
        generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
        generation_config=schema.config.generation_for(operation=operation, phase="coverage"),
        auth_storage=None,
        override=Override(),
        feedback=FeedbackSources(),
    )
    groups: dict[tuple[Any, ...], list[schemathesis.Case]] = defaultdict(list)
    for case in generator:
        assert case.meta is not None
        data = case.meta.phase.data
        key = (
            case.meta.generation.mode,
            getattr(data, "scenario", None),
            getattr(data, "parameter_location", None),
            getattr(data, "parameter", None),
        )
        groups[key].append(case)
    for cases in groups.values():
        step = max(1, len(cases) // COVERAGE_PER_SCENARIO)
        yield from cases[::step][:COVERAGE_PER_SCENARIO]


def test_every_check_passes_for_every_operation(broker: BrokerHandle) -> None:
    load_all_checks()
    checks = CHECKS.get_all()
    names = {c.__name__ for c in checks}
    assert {
        "negative_data_rejection",
        "positive_data_acceptance",
        "missing_required_header",
        "unsupported_method",
        "ignored_auth",
    } <= names, names
    schema = load_schema(broker)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {
        "POST /v1/launches",
        "GET /v1/launches/{launch_id}",
        "GET /v1/launches/{launch_id}/logs",
        "DELETE /v1/launches/{launch_id}",
        "GET /v1/audit/report",
        "GET /v1/audit/launches",
    } <= labels
    planted = broker.planted_values()
    failures: list[str] = []
    seen: dict[str, int] = defaultdict(int)

    def exercise(case: schemathesis.Case) -> None:
        assert case.meta is not None
        response = case.call(timeout=30)
        mode = case.meta.generation.mode.value
        seen[f"{case.operation.label} {mode} {response.status_code}"] += 1
        try:
            case.validate_response(response, checks=checks)
        except FailureGroup as group:
            failures.extend(
                f"{case.operation.label} {mode} {response.request.method} "
                f"{str(response.request.url)[:300]} -> {response.status_code}: {f.title}: "
                f"{f.message[:300]} {response.text[:300]}"
                for f in group.exceptions
                if not is_launch_rule(case, response, f)
            )
        if any(value in response.text for value in planted):
            failures.append(f"{case.operation.label} -> a planted value in the response")

    for operation in operations:
        for case in coverage_cases(schema, operation):
            exercise(case)

    @hypothesis.settings(
        max_examples=FUZZ_EXAMPLES_PER_OPERATION * len(operations),
        deadline=None,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        derandomize=True,
    )
    @hypothesis.given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        operation = data.draw(st.sampled_from(operations))
        mode = data.draw(st.sampled_from([GenerationMode.POSITIVE, GenerationMode.NEGATIVE]))
        exercise(data.draw(operation.as_strategy(generation_mode=mode)))

    fuzz()
    assert not failures, "\n".join(sorted(set(failures)))
    # Every operation got valid and invalid requests; the fuzzer got past validation too,
    # not only 422s: real launches were made.
    for label in labels:
        for mode in ("positive", "negative"):
            assert any(k.startswith(f"{label} {mode} ") for k in seen), (label, mode, dict(seen))
    assert any(k.startswith("POST /v1/launches positive 20") for k in seen), dict(seen)
    # The checks that need invalid requests had some to judge: refusals were made.
    assert any(k.startswith("POST /v1/launches negative 422") for k in seen), dict(seen)
    assert any(k.endswith(" 401") for k in seen), dict(seen)
    assert any(k.endswith(" 405") for k in seen), dict(seen)
