"""The C library's allocator inside a worker: are the tuned settings in effect, and a heap
that fragmentation grew beyond its budget given back.

With freed memory kept in one arena (the tuned settings, :mod:`.environment`), concurrent
forward passes of different sizes can leave holes the next passes do not fit: the heap, and
the worker's resident memory, then grow past what its passes need. :func:`release_heap_above`
returns the free pages to the system (``malloc_trim``) once the worker's memory passes a
bound; below it nothing is released, and no pass pays for faulting its memory back in.
"""

from __future__ import annotations

import ctypes
import threading
from functools import cache

import psutil


@cache
def _libc() -> ctypes.CDLL | None:
    """glibc, with the functions used here typed; None elsewhere (musl, macOS)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def allocator_tuned() -> bool | None:
    """Whether the tuned allocator settings are in effect in this process: a large block
    allocated by a thread other than the main one (as a Dask task's) is not ``mmap``-ed.
    None where the C library is not glibc. Checked, not read from the environment: a
    variable set after the process started is in ``os.environ`` but not in effect."""
    libc = _libc()
    if libc is None:
        return None
    found: list[bool] = []

    def probe() -> None:
        before = libc.mallinfo2().hblkhd
        block = libc.malloc(PROBE_BYTES)
        found.append(libc.mallinfo2().hblkhd == before)
        libc.free(block)

    thread = threading.Thread(target=probe, name="pipeline-allocator-probe")
    thread.start()
    thread.join()
    return found[0] if found else None


def release_heap_above(limit: int | None) -> bool:
    """``malloc_trim`` when this process's resident memory exceeds ``limit`` bytes; whether it did."""
    libc = _libc()
    if limit is None or libc is None or psutil.Process().memory_info().rss <= limit:
        return False
    libc.malloc_trim(0)
    return True


PROBE_BYTES = 96 << 20  # above a thread arena's largest heap (64 MiB): mmap-ed unless tuned


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]
