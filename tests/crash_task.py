"""A worker task for tests: the real one, except that it dies on a marked instance.

It stands for a codec that crashes the process on one input (as python-gdcm's RLE
encoder did on odd-sized frames). Worker processes import it by name.
"""

from __future__ import annotations

import os
import time

from node.config import Config
from node.workers import Outcome, Prepared, prepare_incoming

POISON = b"POISON-PILL"


def crash_on_poison(config: Config, path_text: str) -> Outcome | Prepared:
    _die_if_poisoned(path_text)
    time.sleep(0.5)  # keep good instances in flight while the poison kills workers
    return prepare_incoming(config, path_text)


def crash_on_poison_write_slowly(config: Config, path_text: str) -> Outcome | Prepared:
    """Like :func:`crash_on_poison`, but an instance waits 0.5 s in the writer thread,
    so that the poison, sent next, kills the worker while it writes a good one."""
    _die_if_poisoned(path_text)
    result = prepare_incoming(config, path_text)
    if isinstance(result, Prepared):
        write = result.write

        def slowly() -> None:
            time.sleep(0.5)
            write()

        result.write = slowly
    return result


def _die_if_poisoned(path_text: str) -> None:
    with open(path_text, "rb") as f:
        if POISON in f.read():
            os._exit(70)  # the way a C assertion or a segfault ends a worker: at once
