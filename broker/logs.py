"""The broker's log output: plain text (default) or JSON lines. Either way a log line
cannot be forged: text mode writes control characters of the message out visibly
(``\\x0a``, ``\\x1b``) and indents a traceback's lines under its record; JSON mode
writes one object per line (``time``, ``level``, ``logger``, ``message`` and, with an
exception, ``exception``) and JSON escapes the rest. Request paths, DAG and run ids
reach the logs from callers, so this is applied to every logger, uvicorn's included."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Final, Literal, TextIO

from broker.core.escaping import visible

LogFormat = Literal["text", "json"]
LOG_FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s %(message)s"


def _utc(record: logging.LogRecord) -> str:
    return (
        dt.datetime.fromtimestamp(record.created, dt.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class SafeTextFormatter(logging.Formatter):
    """``TEXT_FORMAT`` with the message's control characters escaped; a traceback's
    lines are indented so no line but the first starts like a record."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = visible(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: object) -> str:  # noqa: N802
        text = super().formatException(ei)  # type: ignore[arg-type]
        return "\n".join("    " + visible(line) for line in text.splitlines())

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return "\n".join("    " + visible(line) for line in stack_info.splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _utc(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=True)


def formatter_for(fmt: LogFormat) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return SafeTextFormatter()
    raise ValueError(f"unknown log format {fmt!r}; use one of {', '.join(LOG_FORMATS)}")


def configure_logging(
    fmt: LogFormat = "text", level: int = logging.INFO, stream: TextIO | None = None
) -> None:
    """Route every logger (root; uvicorn's propagate to it when uvicorn is started with
    ``log_config=None``) through one handler in ``fmt``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter_for(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings too, not as raw multi-line stderr text
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
