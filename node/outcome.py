"""What a worker did with one incoming file: the record the node logs and counts.

Kept apart from :mod:`node.workers` so that the receiving process (pipeline,
metrics) can read outcomes without importing the worker side and its codecs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Status(StrEnum):
    """How a worker settled one incoming file."""

    DELIVERED = "delivered"  # every destination has it or holds it in its outbox
    UNROUTED = "unrouted"  # no rule matched: kept in unrouted/
    QUARANTINED = "quarantined"  # unreadable: kept in quarantine/
    GONE = "gone"  # already handled (a crash between delivery and unlink, then a re-scan)


@dataclass
class Outcome:
    """What happened to one incoming file; logged by the main process."""

    incoming: str
    status: Status
    sop_instance_uid: str = ""
    rule: str = ""
    transfer_syntax: str = ""
    compressed: bool = False
    lossy: bool = False
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    delivered: list[str] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)  # pending in a destination's outbox
    errors: list[str] = field(default_factory=list)
