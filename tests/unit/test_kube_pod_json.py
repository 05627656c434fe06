"""The Kubernetes adapter reads pods as the API server's JSON (not the client's model
classes, which cost ~1.5 ms of CPU per pod): the parse, and the watch's handling of its
event lines. The adapter against a real API server: tests/integration/test_kube_adapter.py."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

from broker.core.objects import ContainerStatus, PodInfo
from broker.kube.cluster import KubeCluster, pod_info

ENDED_POD: dict[str, Any] = {
    "kind": "Pod",
    "metadata": {
        "name": "task-1",
        "namespace": "jobs",
        "uid": "u-1",
        "resourceVersion": "42",
        "creationTimestamp": "2026-12-02T10:00:00Z",
        "deletionTimestamp": "2026-12-02T10:05:00Z",
        "labels": {"podbroker.dev/launch-id": "l-1"},
        "annotations": {"podbroker.dev/secrets": "a,b"},
    },
    "spec": {"activeDeadlineSeconds": 600, "containers": [{"name": "base"}]},
    "status": {
        "phase": "Failed",
        "reason": "DeadlineExceeded",
        "conditions": [{"type": "PodScheduled", "status": "True"}],
        "containerStatuses": [
            {
                "name": "base",
                "state": {
                    "terminated": {"exitCode": 3, "reason": "Error", "message": '{"rows": 7}'}
                },
            },
            {"name": "side", "state": {"running": {"startedAt": "2026-12-02T10:01:00Z"}}},
            {"name": "init", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "m"}}},
            {"name": "new", "state": {}},
        ],
    },
}


def test_an_ended_pod_is_read_from_its_json() -> None:
    info = pod_info(ENDED_POD)
    assert info == PodInfo(
        namespace="jobs",
        name="task-1",
        uid="u-1",
        resource_version="42",
        labels={"podbroker.dev/launch-id": "l-1"},
        annotations={"podbroker.dev/secrets": "a,b"},
        phase="Failed",
        reason="DeadlineExceeded",
        containers=(
            ContainerStatus("base", "terminated", 3, "Error", '{"rows": 7}'),
            ContainerStatus("side", "running"),
            ContainerStatus("init", "waiting", reason="ImagePullBackOff", message="m"),
            ContainerStatus("new", "unknown"),
        ),
        created_at=dt.datetime(2026, 12, 2, 10, 0, tzinfo=dt.UTC),
        deleting=True,
        active_deadline_seconds=600,
        scheduled=True,
        unschedulable=None,
    )


def test_an_unschedulable_pod_says_why_and_a_new_one_has_no_status() -> None:
    waiting = {
        "metadata": {"name": "p", "namespace": "jobs"},
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available",
                }
            ],
        },
    }
    info = pod_info(waiting)
    assert (info.scheduled, info.unschedulable) == (False, "0/3 nodes are available")
    bare = pod_info({"metadata": {"name": "p", "namespace": "jobs"}})
    assert (bare.phase, bare.containers, bare.scheduled, bare.deleting) == (None, (), False, False)
    assert bare.created_at is None and bare.unschedulable is None


class _Lines:
    """A watch response: event lines, then the end of the stream."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.body = b"".join(json.dumps(e).encode() + b"\n" for e in events)
        self.released = False

    def stream(self, amt: int | None = None, decode_content: bool = False) -> Iterator[bytes]:
        yield self.body

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        self.released = True


class _WatchingServer:
    """Serves one scripted watch response per request and records each one's query."""

    def __init__(self, responses: list[_Lines]) -> None:
        self.responses = responses
        self.calls: list[dict[str, Any]] = []

    def open(self, method: str, path: str, **kwargs: Any) -> _Lines:
        assert (method, path, kwargs["params"]) == (
            "GET",
            "/api/v1/namespaces/{namespace}/pods",
            {"namespace": "jobs"},
        )
        self.calls.append({k: v for k, v in kwargs["query"].items() if v is not None})
        return self.responses.pop(0)


def _pod(name: str, version: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "jobs", "resourceVersion": version}}


def test_the_watch_resumes_from_its_last_event_and_lists_afresh_after_410() -> None:
    first = _Lines(
        [
            {"type": "ADDED", "object": _pod("a", "10")},
            {"type": "BOOKMARK", "object": _pod("", "11")},
            {"type": "MODIFIED", "object": _pod("a", "12")},
        ]
    )
    gone = _Lines([{"type": "ERROR", "object": {"kind": "Status", "code": 410}}])
    last = _Lines([{"type": "DELETED", "object": _pod("a", "30")}])
    core = _WatchingServer([first, gone, last])
    cluster = KubeCluster.__new__(KubeCluster)  # no API client: only the watch loop runs
    cluster._open = core.open  # type: ignore[method-assign]
    cluster.timeout = (1.0, 1.0)
    seen: list[tuple[str, str, str]] = []
    cluster.watch_managed_pods(
        "jobs",
        lambda kind, pod: seen.append((kind, pod.name, pod.resource_version)),
        stop=lambda: not core.responses and len(seen) == 3,
    )
    # Bookmarks move the position but are not pod events.
    assert seen == [("ADDED", "a", "10"), ("MODIFIED", "a", "12"), ("DELETED", "a", "30")]
    assert core.calls[0]["watch"] is True and "resourceVersion" not in core.calls[0]
    assert core.calls[1]["resourceVersion"] == "12"
    assert "resourceVersion" not in core.calls[2]  # 410: history gone, list afresh
    assert first.released and gone.released and last.released
