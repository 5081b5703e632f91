"""glibc allocator settings for processes that handle image-sized buffers."""

from __future__ import annotations

import contextlib
import ctypes

# mallopt() parameters, from <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024


def keep_large_buffers() -> bool:
    """Serve image-sized buffers from the heap and keep freed ones for the next instance.

    By default glibc gives allocations above its mmap threshold (128 KiB to start
    with) their own mapping and unmaps them on free, and it trims the heap top
    eagerly, so every instance's buffers (data set, pixel array, codestream, output
    file) are page-faulted in anew, and page faults are dear on a VM (measured:
    docs/decisions.md#d7). Buffers above 32 MiB still get their own
    mapping and go back to the system when freed; at most 64 MiB of free heap stays.

    Returns False where the C library is not glibc (nothing is changed then).
    """
    try:
        libc = ctypes.CDLL(None)
        mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False
    return bool(mmap_ok and trim_ok)


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``).

    For after a large instance: its buffers, freed, would otherwise stay in the
    worker, since buffers below the mmap threshold come from the heap, and a long-lived
    allocation above them keeps the heap from shrinking.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)
