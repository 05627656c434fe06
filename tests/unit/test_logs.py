"""Log output cannot be forged; JSON logs are one object per line (issue 12, item 7)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.errors import InvalidRequestError
from broker.logs import JsonFormatter, SafeTextFormatter, configure_logging, formatter_for
from broker.settings import load_settings

FORGED = "dag\n2026-01-01 00:00:00,000 INFO podbroker.api launch allowed\x1b[2J"


def record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad\nINFO forged from an exception")
        except ValueError:
            import sys

            exc_info = sys.exc_info()
    return logging.LogRecord("podbroker.api", logging.WARNING, __file__, 1, msg, args, exc_info)


def test_text_log_escapes_control_characters_of_the_message() -> None:
    line = SafeTextFormatter().format(record("refused %s", FORGED))
    assert "\n" not in line and "\x1b" not in line
    assert "refused dag\\x0a2026-01-01 00:00:00,000 INFO podbroker.api launch allowed\\x1b[2J" in (
        line
    )


def test_text_log_indents_a_traceback_under_its_record() -> None:
    text = SafeTextFormatter().format(record("failed", exc=True))
    first, *rest = text.splitlines()
    assert "WARNING podbroker.api failed" in first
    assert rest and all(line.startswith("    ") for line in rest)


def test_json_log_is_one_object_per_line() -> None:
    formatter = JsonFormatter()
    for rec in (record("refused %s", FORGED), record("failed", exc=True)):
        line = formatter.format(rec)
        assert "\n" not in line and "\x1b" not in line
        entry = json.loads(line)
        assert {"time", "level", "logger", "message"} <= entry.keys()
        assert entry["level"] == "WARNING" and entry["logger"] == "podbroker.api"
        assert entry["time"].endswith("Z")
    assert json.loads(formatter.format(record("refused %s", FORGED)))["message"] == (
        f"refused {FORGED}"
    )
    assert "ValueError" in json.loads(formatter.format(record("failed", exc=True)))["exception"]


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.mark.usefixtures("restore_root_logging")
def test_configure_logging_routes_uvicorn_through_the_one_handler() -> None:
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    logging.getLogger("uvicorn.access").info('%s - "%s %s"', "1.2.3.4", "GET", "/a\nforged")
    entry = json.loads(stream.getvalue())
    assert entry["logger"] == "uvicorn.access"
    assert entry["message"] == '1.2.3.4 - "GET /a\nforged"'


def test_settings_choose_the_log_format(tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    assert load_settings(None).logging.format == "text"
    config.write_text("logging:\n  format: json\n")
    assert isinstance(formatter_for(load_settings(config).logging.format), JsonFormatter)
    config.write_text("logging:\n  format: xml\n")
    with pytest.raises(InvalidRequestError, match=r"logging\.format"):
        load_settings(config)
