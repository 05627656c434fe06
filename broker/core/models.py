"""Plain data shared by the broker, its adapters and the Airflow side (pydantic only)."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)

SECRET_NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,126}[a-z0-9])?$"
ENV_VAR_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
# An env delivery's prefix: empty, or the start of a variable name.
ENV_PREFIX_PATTERN = r"^([A-Za-z_][A-Za-z0-9_]*)?$"
# An absolute path none of whose segments is "..": a segment is empty, starts with
# anything but a dot, is "." or ".x...", or is ".." followed by more.
_SEGMENT = r"([A-Za-z0-9_-][A-Za-z0-9._-]*|\.([A-Za-z0-9_-][A-Za-z0-9._-]*)?|\.\.[A-Za-z0-9._-]+)?"
FILE_MOUNT_PATTERN = rf"^(/{_SEGMENT})+$"
# Airflow's own rules: dag and task ids follow KEY_REGEX (airflow.utils.helpers, at most
# 250 characters); run ids the scheduler's default ``allowed_run_id_pattern`` (which also
# covers the ids Airflow makes itself, ``manual__<timestamp>`` ...).
AIRFLOW_KEY_PATTERN = r"^[\w.-]+$"
AIRFLOW_RUN_ID_PATTERN = r"^[A-Za-z0-9_.~:+-]+$"
# Text the broker stores or echoes carries no control characters (NUL, newline, ESC,
# DEL, C1): they forge log and report lines, and PostgreSQL refuses NUL outright.
PRINTABLE_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"
# Text passed to the pod only (command, args, env values) may hold newlines and tabs
# (a script), never NUL.
NO_NUL_PATTERN = r"^[^\x00]*$"
# Airflow stores ids and indexes in 32-bit integer columns.
INT32_MAX = 2**31 - 1


def _json_integer(value: Any) -> Any:
    """A JSON integer as JSON Schema means it (``3`` or ``3.0``), never a boolean or a
    string: no lax coercion of ``true`` or ``"3"``."""
    if isinstance(value, bool | str | bytes):
        raise ValueError("Input should be a JSON integer")
    return value


NO_LAX_INTEGER = BeforeValidator(_json_integer)
"""Put it after an int's ``Field`` bounds (before them, the schema loses the bounds)."""

MAX_SECRET_KEYS = 256
"""At most this many keys in one ``mapping`` (a Kubernetes Secret holds 1 MiB anyway)."""


_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,6})?([Zz]|[+-]\d{2}:\d{2})$")


def _rfc3339(value: object) -> object:
    """Exactly the spelling the schema promises: no number taken as epoch seconds, no
    date-time without its offset."""
    if value is None:
        return value
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError("a date-time needs its offset (UTC: Z)")
        return value
    if not isinstance(value, str) or not _RFC3339.match(value):
        raise ValueError("use an RFC 3339 date-time with an offset, e.g. 2026-01-31T00:00:00Z")
    return value


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError("date-time out of range") from None


Timestamp = Annotated[dt.datetime | None, BeforeValidator(_rfc3339), AfterValidator(_utc)]
"""An RFC 3339 date-time with its offset, in UTC once read (None: open)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskIdentity(Strict):
    """Which Airflow task instance a launch is for; the idempotency key of a launch."""

    dag_id: Annotated[str, Field(min_length=1, max_length=250, pattern=AIRFLOW_KEY_PATTERN)]
    task_id: Annotated[str, Field(min_length=1, max_length=250, pattern=AIRFLOW_KEY_PATTERN)]
    run_id: Annotated[str, Field(min_length=1, max_length=250, pattern=AIRFLOW_RUN_ID_PATTERN)]
    try_number: Annotated[int, Field(ge=0, le=INT32_MAX), NO_LAX_INTEGER] = 1
    map_index: Annotated[int, Field(ge=-1, le=INT32_MAX), NO_LAX_INTEGER] = -1
    ti_id: Annotated[str, Field(pattern=r"^[0-9A-Fa-f-]{8,64}$")] | None = None
    """Airflow's task instance id (``ti.id``), checked with Airflow when verification is
    on; not part of the launch's idempotency key."""

    @property
    def instance_key(self) -> tuple[str, str, str, int]:
        """Which task instance, whatever the try: (dag_id, run_id, task_id, map_index)."""
        return (self.dag_id, self.run_id, self.task_id, self.map_index)


class EnvDelivery(Strict):
    """Deliver a secret's keys as environment variables: each key upper-cased behind
    ``prefix`` (``prefix="DB_"``: key ``password`` -> ``DB_PASSWORD``; by default the
    secret's name, so ``orders-db`` gives ``ORDERS_DB_PASSWORD``; ``prefix=""`` for none),
    or exactly as ``mapping`` says (key -> variable); unmapped keys are not delivered."""

    # The schema states both rules below: "not both" as ``not``, the prefix by its pattern.
    model_config = ConfigDict(
        json_schema_extra={
            "not": {
                "required": ["prefix", "mapping"],
                "properties": {"prefix": {"type": "string"}, "mapping": {"type": "object"}},
            }
        }
    )

    type: Literal["env"] = "env"
    prefix: Annotated[str, Field(max_length=128, pattern=ENV_PREFIX_PATTERN)] | None = None
    mapping: (
        Annotated[
            dict[
                Annotated[str, Field(max_length=253, pattern=PRINTABLE_PATTERN)],
                Annotated[str, Field(max_length=256, pattern=ENV_VAR_PATTERN)],
            ],
            Field(max_length=MAX_SECRET_KEYS),
        ]
        | None
    ) = None

    @model_validator(mode="after")
    def _one_style(self) -> EnvDelivery:
        if self.prefix is not None and self.mapping is not None:
            raise ValueError("give either prefix or mapping, not both")
        return self


class FileDelivery(Strict):
    """Deliver a secret's keys as files (one per key, mode 0400) under ``mount_path``."""

    # The default serves Python callers; on the wire ``type`` is required (it is what
    # tells a file delivery from the default env one).
    model_config = ConfigDict(json_schema_extra={"required": ["type", "mount_path"]})

    type: Literal["file"] = "file"
    mount_path: Annotated[str, Field(pattern=FILE_MOUNT_PATTERN, max_length=250)]


def _delivery_type(value: Any) -> str:
    """The delivery's ``type``; absent means "env" (the default), as the schema says."""
    if isinstance(value, dict):
        kind = value.get("type", "env")
        return kind if isinstance(kind, str) else ""
    return str(getattr(value, "type", ""))


Delivery = Annotated[
    Annotated[EnvDelivery, Tag("env")] | Annotated[FileDelivery, Tag("file")],
    Discriminator(_delivery_type),
]


class SecretRequest(Strict):
    """One secret a task asks for, by logical name, and how it wants it."""

    name: Annotated[str, Field(pattern=SECRET_NAME_PATTERN)]
    delivery: Delivery = Field(default_factory=EnvDelivery)


class Caller(Strict):
    """An authenticated caller of the broker API."""

    identity: str  # e.g. "system:serviceaccount:airflow:airflow-worker" or "static:dev"
    allowed_dag_globs: tuple[str, ...] = ()
    bound_pod: str | None = None
    """The pod the caller's token is bound to (projected ServiceAccount tokens), if any."""
    bound_pod_uid: str | None = None
