"""get_provider_info lists what the package holds (issue 16 item 11): it validates
against the installed Airflow's provider schema, every module and class it names
imports, the extra links and task decorators are exactly those that exist (the extra
link and the ``@task.broker`` decorator arrive from other branches), and the config
section names every ``[podbroker]`` option the package reads."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import airflow
import jsonschema
import pytest
from airflow.sdk import BaseHook, BaseOperator, BaseOperatorLink
from airflow.triggers.base import BaseTrigger

import airflow_plugin
from airflow_plugin.provider import get_provider_info

PACKAGE = Path(airflow_plugin.__file__).parent


def own_modules() -> list[ModuleType]:
    """Every module of airflow_plugin except the example DAGs."""
    names = [
        m.name
        for m in pkgutil.walk_packages([str(PACKAGE)], "airflow_plugin.")
        if not m.name.startswith("airflow_plugin.example_dags")
    ]
    return [importlib.import_module(n) for n in names]


def defined_subclasses(base: type) -> set[str]:
    return {
        f"{module.__name__}.{name}"
        for module in own_modules()
        for name, obj in vars(module).items()
        if inspect.isclass(obj)
        and issubclass(obj, base)
        and obj is not base
        and obj.__module__ == module.__name__
    }


def modules_of(info: dict[str, object], key: str) -> list[str]:
    entries = info[key]
    assert isinstance(entries, list)
    return [m for entry in entries for m in entry["python-modules"]]


def test_it_validates_against_airflows_provider_schema() -> None:
    schema = json.loads((Path(airflow.__file__).parent / "provider_info.schema.json").read_text())
    jsonschema.validate(get_provider_info(), schema)


@pytest.mark.parametrize(
    ("key", "base"),
    [("operators", BaseOperator), ("hooks", BaseHook), ("triggers", BaseTrigger)],
)
def test_every_listed_module_holds_its_kind_and_every_class_is_listed(key: str, base: type) -> None:
    info = get_provider_info()
    listed = modules_of(info, key)
    classes = defined_subclasses(base)
    # A TaskFlow decorator's operator is reached through "task-decorators", not listed.
    decorator_modules = {
        d["class-name"].rpartition(".")[0] for d in info.get("task-decorators", [])
    }
    holding = {
        name.rpartition(".")[0]
        for name in classes
        if name.rpartition(".")[0] not in decorator_modules
    }
    assert set(listed) == holding
    names = {i["integration-name"] for i in info["integrations"]}
    assert {entry["integration-name"] for entry in info[key]} <= names


def test_extra_links_are_exactly_the_links_that_exist() -> None:
    assert set(get_provider_info().get("extra-links", [])) == defined_subclasses(BaseOperatorLink)


def test_the_broker_task_decorator_is_listed_only_when_it_exists() -> None:
    listed = get_provider_info().get("task-decorators", [])
    try:
        module = importlib.import_module("airflow_plugin.decorators")
    except ModuleNotFoundError:
        assert listed == []
        return
    assert listed == [{"name": "broker", "class-name": "airflow_plugin.decorators.broker_task"}]
    assert callable(module.broker_task)


def test_the_config_section_names_every_option_the_package_reads() -> None:
    read = {
        option
        for path in PACKAGE.rglob("*.py")
        for option in re.findall(r"conf\.get\w*\(\s*\"podbroker\",\s*\"(\w+)\"", path.read_text())
    }
    assert read, "the plugin reads [podbroker] conn_id"
    options = get_provider_info()["config"]["podbroker"]["options"]
    assert set(options) == read
