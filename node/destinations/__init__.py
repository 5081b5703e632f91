"""Where routed instances go: a folder, or a DICOM peer.

Workers deliver to folders directly; what they cannot deliver at once waits in the
destination's outbox (``<spool>/destinations/<name>/pending/``) for its runner.
"""

from __future__ import annotations

from typing import Protocol

from node.config import Config
from node.spool import Spool


class Runner(Protocol):
    """Delivers one destination's outbox in the background."""

    def start(self) -> None: ...

    def notify(self) -> None:
        """Something new is pending; look now rather than at the next poll."""

    def stop(self, timeout: float = 30.0) -> None: ...


def start_runners(config: Config, spool: Spool) -> dict[str, Runner]:
    """One started runner per destination that has an outbox to work on."""
    return {}
