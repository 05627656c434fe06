"""The repository files the dev stack works from. They are always handed in (the
`podbroker-dev` options default to paths under the current directory, `make` runs it
from the repository root; the tests pass their own checkout), never guessed from where
this package happens to be installed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from podbroker_devstack.procs import StackError


@dataclass(frozen=True)
class SourceTree:
    policies: Path
    """Policy folder applied to Vault (`podbroker policies apply`)."""
    chart: Path
    """The Helm chart whose ServiceAccount and RBAC the dev broker runs with."""
    build_script: Path
    """deploy/devstack/build-binaries.sh: builds (once) and names the cached binaries."""

    @classmethod
    def in_checkout(cls, root: Path) -> SourceTree:
        """The standard places inside a podbroker checkout at ``root``."""
        return cls(
            policies=root / "policies",
            chart=root / "deploy" / "helm" / "podbroker",
            build_script=root / "deploy" / "devstack" / "build-binaries.sh",
        )

    def check(self) -> None:
        """Fail with one clear message when a path does not exist."""
        missing = [f"{name} {path}" for name, path in vars(self).items() if not Path(path).exists()]
        if missing:
            raise StackError(
                f"not found: {', '.join(missing)} (run from the repository root, as make does,"
                " or pass the paths explicitly)"
            )
