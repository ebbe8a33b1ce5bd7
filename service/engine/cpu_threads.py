"""Keep one OpenMP thread team in the process, so the engine thread's team keeps spinning.

PyTorch's CPU build runs its kernels on GNU OpenMP, which gives every thread that starts a
parallel region a team of worker threads of its own, for the life of that thread. Once the
process holds more OpenMP threads than CPUs (say the main thread loaded the model, then the
engine thread runs the steps), libgomp stops busy-waiting between parallel regions and parks its
workers in the kernel, and every one of the hundreds of small regions of a decode step pays a
wake-up: measured here, a batch-1 gpt2 step went from 19 ms to 27 ms.

`release_openmp_threads()` ends the calling thread's idle team (OpenMP 5's
`omp_pause_resource_all`); a thread that did compute before handing the model to the engine
thread calls it. It is a no-op where the runtime is not libgomp or the call is missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep what can be kept


@cache
def _libgomp() -> ctypes.CDLL | None:
    """The libgomp that torch's kernels use: the copy in torch/lib, else the system one."""
    candidates = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    system = ctypes.util.find_library("gomp")
    paths = [str(p) for p in candidates] + ([system] if system else [])
    for path in paths:
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
        except OSError:  # not loaded into this process: not the one torch uses
            continue
        if hasattr(lib, "omp_pause_resource_all"):
            lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
            lib.omp_pause_resource_all.restype = ctypes.c_int
            return lib
    return None


def release_openmp_threads() -> bool:
    """End the calling thread's OpenMP worker threads; True if the runtime did so.

    Safe to call at any time outside a parallel region: the next parallel region of this thread
    simply starts a new team.
    """
    if torch.get_num_threads() <= 1:
        return False
    lib = _libgomp()
    if lib is None:
        return False
    released = lib.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0
    if not released:
        logger.debug("omp_pause_resource_all refused to release this thread's team")
    return released
