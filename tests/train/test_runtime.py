"""unidiff.runtime: the allocator settings make glibc reuse a freed large buffer in place.

Each case runs in a fresh interpreter, because the settings must be made before any
thread allocates and cannot be undone. The check is independent of XLA: malloc and
memset a 256 MiB buffer, free it, allocate and touch it again, and count the minor page
faults of the second round. glibc's default serves each round with a fresh mmap (one
fault per 4 KiB page); tuned, the second round reuses resident heap pages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_PROBE = r"""
import json, resource, sys
from unidiff.runtime import tune_host_allocator
applied = tune_host_allocator()
import ctypes, ctypes.util
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 256 * 2**20
ctypes.memset(p := libc.malloc(n), 1, n); libc.free(p)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(p := libc.malloc(n), 1, n)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(opt_out: bool) -> dict:
    env = dict(os.environ)
    env.pop("UNIDIFF_DEFAULT_MALLOC", None)
    if opt_out:
        env["UNIDIFF_DEFAULT_MALLOC"] = "1"
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt only")
def test_tuned_allocator_reuses_large_buffers_without_faults():
    default, tuned = _probe(opt_out=True), _probe(opt_out=False)
    assert default["applied"] is False and tuned["applied"] is True
    pages = 256 * 2**20 // 4096
    # Default glibc: the second 256 MiB buffer is a fresh mapping, faulted page by page.
    assert default["faults"] > 0.9 * pages, default
    assert tuned["faults"] < 0.05 * default["faults"], (tuned, default)
