"""Where routed instances go: the registry of destination types.

Modelled on pydicom's encoder registry (``pydicom.pixels.encoders``): a type is
registered by name and module path in :data:`TYPES` and imported on first use. Each
type module defines one :class:`DestinationType` object named ``TYPE``, which owns
everything the rest of the node needs to know about that kind of destination:

- ``settings``: its frozen settings dataclass (fields ``name`` and ``type`` plus its
  own), and :meth:`~DestinationType.parse`, which builds them from the YAML body of
  ``destinations.<name>`` (read the values with :mod:`node.schema`, so that every
  error names its place);
- :meth:`~DestinationType.deliver`: immediate delivery, run in a worker process as
  soon as an instance is compressed (a folder writes it there); a type that returns
  False (the default) gets the instance in its outbox
  ``<spool>/destinations/<name>/pending/`` instead;
- :meth:`~DestinationType.runner`: the background :class:`Runner` in the node's main
  process that works the outbox (retries, sending, Storage Commitment reports);
- :meth:`~DestinationType.describe` and :meth:`~DestinationType.summary`: the lines
  ``dicom-node check-config`` and ``dicom-node queue`` print;
- optionally :meth:`~DestinationType.echo` (``dicom-node echo``) and, in its runner,
  :meth:`Runner.commitment_report` (Storage Commitment reports that reach the node's
  own SCP).

A new type is one new module plus one line in :data:`TYPES`. A type module is
imported wherever a config is loaded or unpickled (worker processes too): it must be
cheap to import, so a type imports its network or HTTP libraries inside
``runner()`` / ``echo()``, as ``node.destinations.dicom`` does with pynetdicom's SCU.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from node.errors import ConfigError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from node.config import Config
    from node.spool import Spool

# `type:` value -> module that defines its TYPE. Imported on first use.
TYPES: dict[str, str] = {
    "folder": "node.destinations.folder",
    "dicom": "node.destinations.dicom",
    "dicomweb": "node.destinations.dicomweb_config",
}


class DestinationSettings(Protocol):
    """What every destination type's settings dataclass has."""

    @property
    def name(self) -> str:
        """The destination's name: its key under ``destinations:``."""

    @property
    def type(self) -> str:
        """The ``type:`` it was configured with (a key of :data:`TYPES`)."""


S = TypeVar("S", bound=DestinationSettings)
# Writes the instance to a path durably (the first destination writes the encoded
# data set, the others link or copy that file).
Put = Callable[[Path], None]


@dataclass(frozen=True)
class ParseContext:
    """What a type's parser may need besides its own YAML body."""

    base_dir: Path  # relative paths are resolved against it
    node_ae_title: str  # the node's own AE title (a default for calling AE titles)


class CannotDeliver(Exception):
    """Immediate delivery failed for a reason of the type's own (not an OSError)."""


class Runner(ABC):
    """Works one destination's outbox in the background of the node's main process."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def notify(self) -> None:
        """Something new is pending; look now rather than at the next poll."""

    @abstractmethod
    def stop(self, timeout: float = 30.0) -> None: ...

    def commitment_report(self, transaction_uid: str, event_type: int, info: Any) -> int | None:
        """Settle a Storage Commitment report that reached the node's SCP.

        Returns the N-EVENT-REPORT response status if ``transaction_uid`` is one of this
        destination's, else None (the default: the type does no commitment).
        """
        return None


class DestinationType(ABC, Generic[S]):
    """One kind of destination; see the module docstring for what each part is for."""

    name: str  # the `type:` value
    settings: type[S]
    # Its runner runs in the sending process (node/senders.py), away from the thread
    # that answers C-STOREs. A type whose runner only retries local writes may stay in
    # the main process, which then needs no sending process at all (about 80 MB).
    sends: bool = True

    @abstractmethod
    def parse(self, name: str, body: dict[str, Any], where: str, context: ParseContext) -> S:
        """Settings from the YAML mapping ``body`` at ``where``; ConfigError if invalid."""

    @abstractmethod
    def describe(self, dest: S) -> str:
        """One line for ``check-config``: where it goes and how."""

    @abstractmethod
    def summary(self, dest: S) -> str:
        """A few words for ``queue``: the kind and the address."""

    @abstractmethod
    def runner(self, dest: S, spool: Spool) -> Runner:
        """The (not yet started) runner for this destination's outbox."""

    def deliver(self, dest: S, ds: Dataset, put: Put) -> bool:
        """Deliver at once, in the worker; False: put it in the outbox instead.

        Raising OSError or :class:`CannotDeliver` also puts it in the outbox, and the
        reason goes in the instance's outcome.
        """
        return False

    def status_lines(self, dest: S, spool: Spool) -> list[str]:
        """Extra lines for ``queue`` about the destination's state (e.g. held)."""
        return []

    def echo(self, dest: S, sop_class: str) -> str:
        """``dicom-node echo``: test the destination, return what to print."""
        raise ConfigError(f"destinations.{dest.name}: a {self.name} destination cannot be echoed")


def destination_type(name: object, where: str = "type") -> DestinationType[Any]:
    """The registered type ``name``; ConfigError (naming ``where``) if there is none."""
    if not isinstance(name, str) or name not in TYPES:
        raise ConfigError(f"{where}: {name!r} is not a destination type; known: {', '.join(TYPES)}")
    # importlib keeps the module: after the first call this is a dictionary look-up.
    kind = importlib.import_module(TYPES[name]).TYPE
    assert isinstance(kind, DestinationType) and kind.name == name, TYPES[name]
    return kind


def type_of(dest: DestinationSettings) -> DestinationType[Any]:
    return destination_type(dest.type)


def start_runners(config: Config, spool: Spool) -> dict[str, Runner]:
    """One started runner per destination."""
    runners: dict[str, Runner] = {}
    try:
        for name, dest in config.destinations.items():
            runner = type_of(dest).runner(dest, spool)
            runner.start()
            runners[name] = runner
    except BaseException:
        for runner in runners.values():
            runner.stop(timeout=5.0)
        raise
    return runners
