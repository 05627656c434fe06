"""An anchor is the chain head a verifier saw last (position and hash), kept OUTSIDE
the audit store (a file, a SIEM, a ticket). A chain that verifies on its own can still
have been truncated to empty or rolled back to an older signed head by someone with
database access; comparing it with the anchor catches both."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from broker.audit.chain import VerifyResult
from broker.audit.store import AuditStore
from broker.errors import InvalidRequestError


@dataclass(frozen=True)
class Anchor:
    position: int
    hash: str

    @classmethod
    def read(cls, path: Path) -> Anchor | None:
        """The anchor in ``path``, or None if the file does not exist yet."""
        try:
            data = json.loads(path.read_text())
            return cls(position=int(data["position"]), hash=str(data["hash"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidRequestError(f"{path}: not a podbroker audit anchor ({exc})") from exc

    def write(self, path: Path) -> None:
        """Replace ``path`` atomically, so a crash never leaves half an anchor."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"position": self.position, "hash": self.hash}) + "\n")
        os.replace(tmp, path)


def check_anchor(store: AuditStore, result: VerifyResult, anchor: Anchor) -> str | None:
    """Why the verified chain contradicts ``anchor``, or None when it extends it."""
    if result.last_position < anchor.position:
        return (
            f"the store ends at position {result.last_position} but position "
            f"{anchor.position} was seen before: records were truncated or rolled back"
        )
    for record in store.records(anchor.position, anchor.position + 1):
        if record.hash != anchor.hash:
            return f"record {anchor.position} is not the one seen before: the history was rewritten"
        return None
    return f"record {anchor.position} is missing"
