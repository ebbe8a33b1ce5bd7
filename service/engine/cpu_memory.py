"""Keep large freed blocks in the process, so every step's big tensors need no new pages.

A step allocates a few large tensors (the logits of a 256-row batch are 51 MB) and frees them
again. glibc serves blocks over 32 MB straight from the kernel (mmap) and hands them back on
free, so the next step's identical allocation faults in every one of its pages afresh: measured
here, 51 MB of logits cost 14 ms of page faults per step, more than the work that fills them.
`keep_freed_memory()` tells glibc never to use mmap for allocations and never to trim the heap,
so a freed block is reused as it is (what jemalloc and tcmalloc do by default, and what PyTorch's
CPU performance guides recommend them for). The process keeps the memory it reached at its peak,
which for a server with a steady working set is the point. A no-op where libc is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed large blocks instead of unmapping them; True if it agreed."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    agreed = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
    if not agreed:
        logger.debug("glibc refused the allocation settings; large tensors stay mmap'ed")
    return agreed
