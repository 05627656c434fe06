"""The grant index (by secret, by the literal prefix of the DAG glob) decides exactly as
a scan of every grant in policy order would."""

from __future__ import annotations

import fnmatch

from broker.core.models import SecretRequest, TaskIdentity
from broker.core.policy import PolicySet, decide

GLOBS = ["*", "a*", "ab*", "ab?", "[ab]x*", "abc", "b*", "a?c*"]


def _policy() -> PolicySet:
    grants = [
        {"id": f"g{i}", "dags": glob, "secrets": ["s1", "s2"] if i % 2 else ["s2"]}
        for i, glob in enumerate(GLOBS)
    ]
    return PolicySet.model_validate(
        {
            "catalog": {
                "s1": {"type": "kv", "mount": "secret", "path": "p/s1"},
                "s2": {"type": "kv", "mount": "secret", "path": "p/s2"},
            },
            "teams": {"t": {"grants": grants[::-1]}},
        }
    )


def test_index_picks_the_first_matching_grant_in_policy_order() -> None:
    policy = _policy()
    ordered = [gid for gid, _ in policy.grants()]
    for dag in ["abc", "abx", "ax", "bx", "zz", "a", "ab", "abcd", "xx"]:
        task = TaskIdentity(dag_id=dag, task_id="t", run_id="r", try_number=1)
        for name in ("s1", "s2"):
            decision = decide(policy, task, [SecretRequest(name=name)])
            expected = next(
                (
                    gid
                    for gid in ordered
                    for _, g in [next(x for x in policy.grants() if x[0] == gid)]
                    if name in g.secrets and fnmatch.fnmatchcase(dag, g.dags)
                ),
                None,
            )
            got = decision.secrets[name].grant if decision.allowed else None
            assert got == expected, (dag, name)
