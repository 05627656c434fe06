"""The operator's extra link: "Pod launch", to the podbroker plugin's task-instance view
(pod, phase, events, the report entry of this try). Airflow 3 computes it on the worker
when the task finishes and keeps it as an XCom, so the UI needs no broker call to show it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from airflow.sdk import BaseOperatorLink, conf

if TYPE_CHECKING:
    from airflow.models.taskinstancekey import TaskInstanceKey
    from airflow.sdk import BaseOperator

# Served by the plugin's FastAPI app (mounted under /podbroker).
TASK_INSTANCE_PATH = "/podbroker/task-instance"


def _base_path() -> str:
    """The path part of ``[api] base_url`` ("" at the root), so the link also works when
    Airflow is served under a prefix."""
    base_url = conf.get("api", "base_url", fallback="") or ""
    return urlsplit(base_url).path.rstrip("/")


def task_instance_url(
    *, dag_id: str, run_id: str, task_id: str, map_index: int, try_number: int
) -> str:
    """``/podbroker/task-instance?dag_id=..&run_id=..&task_id=..&map_index=..&try_number=..``"""
    query = urlencode(
        {
            "dag_id": dag_id,
            "run_id": run_id,
            "task_id": task_id,
            "map_index": map_index,
            "try_number": try_number,
        }
    )
    return f"{_base_path()}{TASK_INSTANCE_PATH}?{query}"


class BrokerLaunchLink(BaseOperatorLink):
    """ "Pod launch" button of a BrokerPodOperator task instance."""

    name = "Pod launch"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey | Any) -> str:
        map_index = getattr(ti_key, "map_index", -1)
        return task_instance_url(
            dag_id=ti_key.dag_id,
            run_id=ti_key.run_id,
            task_id=ti_key.task_id,
            map_index=-1 if map_index is None else int(map_index),
            try_number=int(ti_key.try_number),
        )
