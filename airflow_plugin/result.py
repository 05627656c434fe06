"""A task's return value, KubernetesPodOperator style but without an exec sidecar: the task
container writes its result to its termination message file, ``/dev/termination-log``
(the Kubernetes default ``terminationMessagePath``), the kubelet puts that text into the
container's terminated state, and the broker's ``GET /v1/launches/{id}`` returns it as
``containers[].message``. Pure: no I/O, no Airflow import.

Only what the task wrote is returned: the message of the task container (``base``) once it
has terminated, nothing when the file was left empty. The broker's pods keep the default
``terminationMessagePolicy: File``; with ``FallbackToLogsOnError`` a failed container's log
tail would stand in for the file, which is why a failed pod never returns a value."""

from __future__ import annotations

import json
from typing import Any

from broker.core.api_models import LaunchView

# The broker's (and KubernetesPodOperator's) name of the task container; the same as
# broker.core.objects.CONTAINER_NAME, which this side does not import (a unit test checks).
CONTAINER_NAME = "base"

TERMINATION_LOG_PATH = "/dev/termination-log"
# The kubelet reads at most this much of the file and drops the rest without a sign.
MAX_TERMINATION_MESSAGE_BYTES = 4096


class ResultWithheldError(ValueError):
    """The broker withheld the termination message: it held a value issued to the
    launch (or could no longer be checked). Never pushed."""


class ResultUncheckedError(ValueError):
    """The broker has not given its verdict on the termination message yet (its cleanup
    of the ended pod lags): nothing is pushed; a retry may succeed."""


class ResultTooLargeError(ValueError):
    """The termination message reached the kubelet's cap: it may have been cut short, so
    it is refused rather than pushed half-written."""


def termination_message(view: LaunchView) -> str | None:
    """The task container's termination message, None when it wrote nothing (or has not
    terminated)."""
    for container in view.containers:
        if container.name == CONTAINER_NAME and container.state == "terminated":
            return container.message or None
    return None


def task_result(view: LaunchView) -> Any:
    """The value for XCom ``return_value``: the termination message parsed as JSON when
    it is JSON (KubernetesPodOperator pushes a parsed ``return.json``), else the text as
    written; None (nothing pushed) when the task wrote nothing.

    Raises ResultTooLargeError when the message is at the kubelet's 4096-byte cap, and
    ResultWithheldError when the broker's leak guard withheld it (``result_check``),
    ResultUncheckedError while the broker has not checked it yet."""
    check = getattr(view, "result_check", None)
    if check == "withheld":
        raise ResultWithheldError(
            f"the termination message of pod {view.pod_name} was withheld by the broker: "
            "it contained a value issued to this launch (audited as secret_exposed), or "
            "could no longer be checked. Nothing is pushed to XCom; write a result that "
            "does not contain a secret."
        )
    if check == "unchecked":
        raise ResultUncheckedError(
            f"the broker has not yet checked the termination message of pod {view.pod_name} "
            "for issued values: nothing is pushed to XCom"
        )
    message = termination_message(view)
    if message is None:
        return None
    size = len(message.encode())
    if size >= MAX_TERMINATION_MESSAGE_BYTES:
        raise ResultTooLargeError(
            f"the termination message of pod {view.pod_name} is {size} bytes, the kubelet's "
            f"limit is {MAX_TERMINATION_MESSAGE_BYTES}: it may have been cut short, so it is "
            "not pushed to XCom. Write a smaller result (for example a path or an object "
            f"store key) to {TERMINATION_LOG_PATH}."
        )
    try:
        return json.loads(message)
    except ValueError:
        return message
