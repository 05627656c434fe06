"""`make chaos`: the fault loops at full size on a fresh local stack; prints figures and
exits 1 if any invariant fails."""

from __future__ import annotations

import sys
from pathlib import Path

from podbroker_devstack.sources import SourceTree
from podbroker_devstack.stack import local_stack
from tests.chaos.suite import FULL, ChaosStack, run_all


def main() -> int:
    sources = SourceTree.in_checkout(Path(__file__).resolve().parents[2])
    with local_stack(sources, progress=print) as stack:
        chaos = ChaosStack(stack.folder, stack.kube, stack.vault, stack.postgres, sources)
        results = run_all(chaos, FULL)
    failed = [title for title, figures in results.items() if not figures.ok]
    for title in failed:
        print(f"FAILED: {title}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
