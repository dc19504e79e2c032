"""Process-level settings for the experiment binaries, benchmarks and tests.

``use_compilation_cache(path)`` (the binaries' ``--compilation_cache_dir``) keeps XLA's
compiled programs in a directory, so that a rerun, a resumed run or a repeated benchmark
loads them instead of compiling again: the cpu benchmark suite took 1 min 34 s to 1 min
57 s with a filled cache against 2 min 42 s to 2 min 57 s compiling (benchmarks/README.md,
"Compilation").

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

from unidiff.outputs import check_output_dir

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


COMPILATION_CACHE_FLAG = "compilation_cache_dir"
COMPILATION_CACHE_HELP = (
    "Directory that keeps XLA's compiled programs between runs (JAX's persistent compilation "
    "cache; created if missing): a rerun, a resumed run or a repeated benchmark with the same "
    "programs loads them instead of compiling. Unset = JAX's default (off unless "
    "JAX_COMPILATION_CACHE_DIR is set). Share it only with users you trust: a cached program "
    "is run as it is.")


def quiet_backend_probe() -> None:
    """Keep JAX's backend probe out of the binaries' logs. On a machine without a TPU,
    JAX logs "Unable to initialize backend 'tpu': ... libtpu.so" at INFO while it looks
    for one, which absl's handler shows as the first line of every run, reading like a
    failure. A backend that was asked for and fails still raises."""
    import logging

    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def define_compilation_cache_flag():
    """Define ``--compilation_cache_dir`` on absl's global flags; returns its holder."""
    from absl import flags

    return flags.DEFINE_string(COMPILATION_CACHE_FLAG, None, COMPILATION_CACHE_HELP)


def use_compilation_cache(path: str | None, flag: str = COMPILATION_CACHE_FLAG) -> str | None:
    """Keep XLA's compiled programs in ``path`` (created on first use); returns its absolute
    path, or None (nothing changed) when ``path`` is empty.

    Call it before the first compilation: JAX decides once per process whether its cache
    is in use, so this also resets that decision. A cached program is reused only for the
    same program, compile options (XLA flags and some of JAX's own settings among them),
    devices and jax/jaxlib versions; JAX caches programs whose compilation took at least
    ``jax_persistent_cache_min_compile_time_secs`` (default 1 s). JAX writes an entry in
    place, not through a rename, so one cut short by a kill stays unreadable: that
    program is then compiled on every run, with a warning naming it, until the directory
    is emptied. Raises ValueError naming ``--flag`` when ``path`` cannot be a writable
    folder (``unidiff.outputs.check_output_dir``).
    """
    if not path:
        return None
    # Checked as any output folder (a file, or an unwritable ancestor, is refused); JAX
    # creates it on its first use.
    where = check_output_dir(flag, os.path.expanduser(path))
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", where)
    compilation_cache.reset_cache()
    return where
