"""Moved to :mod:`broker.cli.policy_folder` (reading/writing) and
:mod:`broker.core.policy` (parsing). Kept only while ``broker/devstack/broker_env.py``
still imports from here; delete it once that import is changed."""

from broker.cli.policy_folder import load_policy_dir

__all__ = ["load_policy_dir"]
