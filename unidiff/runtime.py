"""Process-level settings for the experiment binaries, benchmarks and tests.

``tune_host_allocator()`` keeps XLA:CPU's per-step buffers resident. XLA:CPU allocates a
train step's temporary buffer (1.6 GiB for DiT-S/4 at 64x64, batch 8) with
``posix_memalign`` from a worker thread. glibc serves a request that large with a fresh
``mmap`` (a thread arena cannot hold it, whatever ``M_MMAP_MAX`` says) and ``munmap``s it
when the step ends, so every step page-faults its whole working set back in: 400k minor
faults and about a second of kernel time per step on 2 cores (issue 6; found with
``strace -c`` and a gdb catchpoint on ``mmap``). One arena, no ``mmap`` and no trimming
make glibc reuse the same heap pages from step to step: a DiT-S/4 step (batch 8) went
from 4.56 to 3.84 s (median of three alternating runs each), and the quickstart's kernel
time from 148 s to 12 s.

The settings only change where glibc puts memory, never what a program computes. They
must run before the first thread allocates (before ``import jax`` starts XLA's thread
pools), so the binaries call this first thing. Other platforms and C libraries are left
alone; set ``UNIDIFF_DEFAULT_MALLOC=1`` to opt out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt(3) parameters (glibc <malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def tune_host_allocator() -> bool:
    """Configure glibc malloc for XLA:CPU's large per-step buffers; True if applied."""
    if os.environ.get("UNIDIFF_DEFAULT_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Order matters: one arena first, so no thread arena is created and later needs mmap.
    # M_TRIM_THRESHOLD -1 "disables trimming completely" (mallopt(3)).
    return bool(mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0)
                and mallopt(_M_TRIM_THRESHOLD, -1))
