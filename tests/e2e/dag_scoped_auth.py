"""A test-only Airflow auth manager: SimpleAuthManager with DAG-level access per user,
which SimpleAuthManager's roles cannot express (a viewer reads every DAG). The
environment variable PODBROKER_E2E_DAG_ACCESS maps user names to the DAG globs they
may read (JSON); users it does not name keep SimpleAuthManager's answer. Airflow's API
server loads it by name (``[core] auth_manager``)."""

from __future__ import annotations

import json
import os
from fnmatch import fnmatchcase
from typing import Any

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager


def _access() -> dict[str, list[str]]:
    loaded = json.loads(os.environ.get("PODBROKER_E2E_DAG_ACCESS", "{}"))
    return {str(user): [str(g) for g in globs] for user, globs in loaded.items()}


class DagScopedAuthManager(SimpleAuthManager):
    def is_authorized_dag(self, *, method: Any, user: Any, **kwargs: Any) -> bool:
        globs = _access().get(user.get_name())
        if globs is not None:
            details = kwargs.get("details")
            dag_id = getattr(details, "id", None)
            if dag_id is None or not any(fnmatchcase(dag_id, g) for g in globs):
                return False
        return bool(super().is_authorized_dag(method=method, user=user, **kwargs))
