"""Process-level settings that make CPU training faster."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_tuned = False


def tune_allocator() -> bool:
    """Keeps freed memory in the process heap instead of returning it to the OS.

    A training step allocates and frees thousands of tensors of a few MB (the
    routing's per-chunk temporaries, convolution buffers). glibc serves such sizes
    with fresh mmap()s, so each step would pay the page faults of touching new
    memory again. Serving them from the heap, and not trimming it, lets later
    steps reuse warm pages; the peak stays that of the live tensors plus the
    heap's fragmentation (the routing allocates what outlives a chunk up front to
    keep that small). Only glibc on Linux is tuned; elsewhere this does nothing.
    Returns True when the setting was applied.
    """
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    ok = mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 1 << 30) == 1
    _tuned = ok
    return ok


def allocator_is_tuned() -> bool:
    """Whether :func:`tune_allocator` has changed this process's heap setting."""
    return _tuned


def os_error_reason(e: OSError) -> str:
    """Why a path could not be used, in words that name the path's own problem where the system's
    do not ("File exists" from making a folder where a file stands)."""
    import errno
    import os

    where = e.filename
    if e.errno == errno.EEXIST and where is not None and os.path.exists(where) and not os.path.isdir(where):
        return "it is a file, where a folder is needed"
    if e.errno == errno.ENOTDIR:
        return "a part of that path is a file, where a folder is needed"
    return e.strerror or str(e)
