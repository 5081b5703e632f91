"""Where routed instances go: a folder, or a DICOM peer.

Workers deliver to folders directly; what they cannot deliver at once waits in the
destination's outbox (``<spool>/destinations/<name>/pending/``) for its runner.
"""

from __future__ import annotations

from typing import Protocol

from node.config import Config, DicomDestination, FolderDestination
from node.spool import Spool


class Runner(Protocol):
    """Delivers one destination's outbox in the background."""

    def start(self) -> None: ...

    def notify(self) -> None:
        """Something new is pending; look now rather than at the next poll."""

    def stop(self, timeout: float = 30.0) -> None: ...


def start_runners(config: Config, spool: Spool) -> dict[str, Runner]:
    """One started runner per destination that has an outbox to work on."""
    # Imported here: node.destinations.folder is imported by workers, which need
    # neither pynetdicom's SCU side nor the runners.
    from node.destinations.dicom import DicomRunner
    from node.destinations.folder_retry import FolderRetryRunner

    runners: dict[str, Runner] = {}
    try:
        for name, dest in config.destinations.items():
            runner: Runner
            if isinstance(dest, DicomDestination):
                runner = DicomRunner(dest, spool)
            elif isinstance(dest, FolderDestination):
                runner = FolderRetryRunner(dest, spool)
            elif dest.type == "dicomweb":  # dicomweb (issue 17)
                from node.destinations.dicomweb import DicomwebRunner

                runner = DicomwebRunner(dest, spool)
            else:
                continue
            runner.start()
            runners[name] = runner
    except BaseException:
        for runner in runners.values():
            runner.stop(timeout=5.0)
        raise
    return runners
