"""Process memory: handing freed memory back to the system."""

from __future__ import annotations

import ctypes
import sys

_LIBC = None


def release_free_memory() -> None:
    """Hand memory the C allocator keeps after freeing back to the system. glibc keeps freed temporaries once its
    dynamic mmap threshold has risen: building SmolLM2's int4 kernel layouts left 80-300 MB resident, varying run to
    run, until a trim."""
    global _LIBC
    if not sys.platform.startswith("linux"):
        return
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(None)
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
