"""Process memory: handing freed memory and file-mapped pages back to the system (Linux/glibc; nothing elsewhere)."""

from __future__ import annotations

import ctypes
import mmap
import sys

_LIBC = None
MADV_DONTNEED = 4


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None)
    return _LIBC


def release_free_memory() -> None:
    """Hand memory the C allocator keeps after freeing back to the system. glibc keeps freed temporaries once its
    dynamic mmap threshold has risen: building SmolLM2's int4 kernel layouts left 80-300 MB resident, varying run to
    run, until a trim."""
    if not sys.platform.startswith("linux"):
        return
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process mapped from files (``/proc/self/maps``; empty off Linux)."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as f:
            rows = [ln.split() for ln in f]
    except OSError:
        return []
    return [tuple(int(x, 16) for x in r[0].split("-")) for r in rows if len(r) >= 6 and r[4] != "0"]


def drop_file_pages(ptr: int, nbytes: int, mapped: list[tuple[int, int]]) -> None:
    """Let the system take back the resident pages of ``nbytes`` at ``ptr`` when they are a mapping of a file
    (safetensors loads that way): for memory about to be dropped. The pages are clean copies of the file, so
    anything still reading them reads the file again (MADV_DONTNEED); anonymous memory is never touched."""
    if not any(lo <= ptr and ptr + nbytes <= hi for lo, hi in mapped):
        return
    page = mmap.PAGESIZE
    lo, hi = -(-ptr // page) * page, (ptr + nbytes) // page * page
    if hi > lo:
        _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED)
