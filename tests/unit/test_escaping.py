"""Output neutralisation of untrusted ids (issue 12, item 7)."""

from __future__ import annotations

import pytest

from broker.core.escaping import csv_cell, visible


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("analytics_etl_daily", "analytics_etl_daily"),
        ("ünïcode-ok", "ünïcode-ok"),
        ("a\nb", "a\\x0ab"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("nul\x00", "nul\\x00"),
        ("cr\r", "cr\\x0d"),
        ("nel\x85", "nel\\x85"),
        ("bidi\u202eevil", "bidi\\u202eevil"),
        ("line\u2028sep", "line\\u2028sep"),
    ],
)
def test_visible(raw: str, shown: str) -> None:
    assert visible(raw) == shown


@pytest.mark.parametrize(
    ("raw", "cell"),
    [
        ("=1+1", "'=1+1"),
        ("+cmd", "'+cmd"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "\\x09x"),
        ("\r=x", "\\x0d=x"),
        ("-", "-"),
        ("-3", "-3"),
        ("1.5", "1.5"),
        ("plain", "plain"),
        ("a=b", "a=b"),
        (7, 7),
    ],
)
def test_csv_cell(raw: object, cell: object) -> None:
    assert csv_cell(raw) == cell
