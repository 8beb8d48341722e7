"""Process memory: giving freed heap pages back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim; a no-op elsewhere). Block-sized
    tensors (4-32 MB) live on the heap, and glibc keeps what they free resident and fragmented: TransMIL's
    streamed 50k step peaked at 1.56 GB of RSS above the process with 0.98 GB live, 1.16 GB when trimmed
    as each block starts."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
