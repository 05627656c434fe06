"""The leak guard for termination messages. A task container's termination message (the
file ``/dev/termination-log``) becomes its Airflow return value (XCom), so a value the
broker issued to the launch must never travel in it. The check runs once, when the pod
has ended and before its Secret (the only copy of the values) is deleted; its verdict is
written on the pod, and the status shows messages of a launch with secrets only once
that verdict is ``clean``. Pure: the service reads the values and writes the verdict."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from broker.core.api_models import ResultCheck
from broker.core.leakguard import encodings
from broker.core.secret_value import SecretValue

__all__ = ["CLEAN", "WITHHELD", "ResultCheck", "exposed_in", "result_check"]

CLEAN: Final = "clean"
WITHHELD: Final = "withheld"


def exposed_in(messages: Iterable[str], values: Mapping[str, Iterable[SecretValue]]) -> set[str]:
    """The names of the secrets a value (or a common encoding of it, as the log leak
    guard masks them) of which appears in any of ``messages``."""
    texts = [m.encode() for m in messages if m]
    exposed: set[str] = set()
    for name, items in values.items():
        for item in items:
            if any(form in text for form in encodings(item.reveal()) for text in texts):
                exposed.add(name)
                break
    return exposed


def result_check(
    secret_names: Sequence[str], claimed: bool, verdict: str | None
) -> ResultCheck | None:
    """The state shown for a launch: None without secrets; ``unchecked`` until the pod
    was claimed at its end; then its verdict, ``withheld`` when a claim carries none (a
    pod cleaned up some other way: its messages can no longer be checked)."""
    if not secret_names:
        return None
    if not claimed:
        return "unchecked"
    return "clean" if verdict == CLEAN else "withheld"
