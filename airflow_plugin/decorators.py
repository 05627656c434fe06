"""``@task.broker``: a TaskFlow function that returns the command of a BrokerPodOperator
pod, as ``@task.kubernetes_cmd`` does for KubernetesPodOperator. The function runs on the
worker when the task starts (its arguments rendered like any TaskFlow argument, upstream
XComs resolved) and returns a list of strings: the container's command, or with
``args_only=True`` the arguments to the image's own entrypoint. Every other keyword is a
BrokerPodOperator parameter (``image``, ``secrets``, ``deferrable``, ...)::

    @task.broker(image="ghcr.io/example/etl:1.4", secrets=["warehouse-loader"])
    def load(day: str) -> list[str]:
        return ["python", "-m", "etl.load", "--day", day]

The task's return value is the pod's termination message (``do_xcom_push`` defaults to
True here, as for every TaskFlow task; see BrokerPodOperator). Registered with Airflow
through the provider metadata (``task-decorators`` in airflow_plugin.provider)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from airflow.sdk import Context
from airflow.sdk.bases.decorator import DecoratedOperator, TaskDecorator, task_decorator_factory

from airflow_plugin.operator import BrokerPodOperator


class _BrokerDecoratedOperator(DecoratedOperator, BrokerPodOperator):
    custom_operator_name = "@task.broker"

    # The command comes from the function, so cmds/arguments are no template fields here.
    template_fields: Sequence[str] = tuple(
        {"op_args", "op_kwargs", *BrokerPodOperator.template_fields} - {"cmds", "arguments"}
    )
    shallow_copy_attrs: Sequence[str] = ("python_callable",)

    def __init__(self, *, args_only: bool = False, **kwargs: Any) -> None:
        if kwargs.get("cmds") is not None or kwargs.get("arguments") is not None:
            raise ValueError(
                "@task.broker takes its command from the decorated function: return it "
                "(or, with args_only=True, the entrypoint's arguments) instead of passing "
                "cmds or arguments"
            )
        kwargs.pop("cmds", None)
        kwargs.pop("arguments", None)
        kwargs.setdefault("do_xcom_push", True)
        self.args_only = args_only
        super().__init__(**kwargs)

    def _generated(self) -> list[str]:
        name = getattr(self.python_callable, "__name__", "the function")
        value = self.python_callable(*self.op_args, **self.op_kwargs)
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise TypeError(
                f"@task.broker function {name} must return a list of strings, "
                f"not {type(value).__name__}"
            )
        if not value:
            raise ValueError(f"@task.broker function {name} returned an empty command")
        return list(value)

    def execute(self, context: Context) -> Any:
        generated = self._generated()
        if self.args_only:
            self.cmds, self.arguments = [], generated
        else:
            self.cmds, self.arguments = generated, []
        return super().execute(context)


def broker_task(
    python_callable: Callable[..., Any] | None = None,
    multiple_outputs: bool | None = None,
    **kwargs: Any,
) -> TaskDecorator:
    """``@task.broker(...)``: see the module docstring. ``args_only=True``: the function
    returns the arguments of the image's entrypoint instead of the command."""
    return task_decorator_factory(
        python_callable=python_callable,
        multiple_outputs=multiple_outputs,
        decorated_operator_class=_BrokerDecoratedOperator,
        **kwargs,
    )
