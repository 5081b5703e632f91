"""A worker task for tests: the real one, except that it dies on a marked instance.

It stands for a codec that crashes the process on one input (as python-gdcm's RLE
encoder did on odd-sized frames). Worker processes import it by name.
"""

from __future__ import annotations

import os
import time

from node.config import Config
from node.workers import Outcome, process_incoming

POISON = b"POISON-PILL"


def crash_on_poison(config: Config, path_text: str) -> Outcome:
    with open(path_text, "rb") as f:
        if POISON in f.read():
            os._exit(70)  # the way a C assertion or a segfault ends a worker: at once
    time.sleep(0.5)  # keep good instances in flight while the poison kills workers
    return process_incoming(config, path_text)
