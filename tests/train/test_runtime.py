"""unidiff.runtime: the allocator settings make glibc reuse a freed large buffer in place;
``use_compilation_cache`` refuses a path that cannot be a cache folder, naming the flag.

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

from unidiff.runtime import use_compilation_cache

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


def test_compilation_cache_path_must_be_a_directory(tmp_path):
    import jax

    before = jax.config.jax_compilation_cache_dir
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match=r"^--compilation_cache_dir .*afile: is a file; expected a folder"):
        use_compilation_cache(str(afile))
    with pytest.raises(ValueError, match=r"^--cache .*afile/sub: .*afile is a file, not a folder"):
        use_compilation_cache(str(afile / "sub"), flag="cache")
    assert afile.read_text() == "x"
    # Unset leaves JAX's setting alone, and so does a refused path.
    assert use_compilation_cache(None) is None and use_compilation_cache("") is None
    assert jax.config.jax_compilation_cache_dir == before


@pytest.mark.parametrize("binary,args", [
    ("pretrain.py", ["--dataset=synthetic", "--model=N/2", "--image_size=8", "--batch_size=8",
                     "--train_steps=1", "--workdir={tmp}/w"]),
    ("finetune.py", ["--init_from={tmp}/none", "--workdir={tmp}/w"]),
    ("sample.py", ["--workdir={tmp}/w"]),
    ("probe.py", ["--workdir={tmp}/w"]),
    ("fid.py", ["--inception_weights={tmp}/none.npz", "--samples={tmp}/none.npz",
                "--ref_stats={tmp}/none.npz"]),
])
def test_every_binary_refuses_a_cache_path_that_is_a_file(tmp_path, binary, args):
    from tests.e2e_helpers import run_binary

    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = run_binary(binary, [a.format(tmp=tmp_path) for a in args]
                      + [f"--compilation_cache_dir={afile}"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert lines == [f"{binary}: error: --compilation_cache_dir {afile}: is a file; expected a "
                     "folder (existing or new)"], proc.stderr[-2000:]
    # Refused first: nothing written, and no complaint about the other (missing) paths.
    assert afile.read_text() == "x" and sorted(tmp_path.iterdir()) == [afile]
