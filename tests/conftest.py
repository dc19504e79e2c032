"""Test-session settings shared by every test directory.

XLA:CPU spends most of a test's time compiling tiny programs; its lowest backend
optimisation level compiles them several times faster. Set before JAX initialises its
backend, so it applies to in-process tests and (through the environment) to the
binaries that end-to-end tests start. Benchmarks and real runs keep the defaults.
"""

import importlib.metadata
import os

from tests.e2e_helpers import SUBPROCESS_ENV


def _fast_compile_flags() -> str:
    flags = ["--xla_backend_optimization_level=0"]
    # jaxlib 0.10 still has the fusion emitters switch (slow to compile for tiny
    # programs); later XLA builds dropped the flag and abort on unknown flags.
    major, minor = (int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2])
    if (major, minor) < (0, 11):
        flags.append("--xla_cpu_use_fusion_emitters=false")
    return " ".join(flags)


if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _fast_compile_flags()).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests build the same tiny programs many times over (every Model instance jits its
# own init, every test its own train step): JAX's persistent compilation cache, shared
# with the binaries the end-to-end tests start, compiles each distinct program once.
# Results are bitwise the same with or without it.
for _name, _value in SUBPROCESS_ENV.items():
    os.environ.setdefault(_name, _value)

from unidiff.runtime import tune_host_allocator  # noqa: E402

# As the binaries do, before jax starts its thread pools (unidiff/runtime.py).
tune_host_allocator()


import pytest  # noqa: E402


@pytest.fixture
def step_configs(monkeypatch):
    """``spy(module)`` replaces ``module.make_train_step`` by a wrapper that records the
    StepConfig of every call (then builds the real step) and returns that list: for
    checking that a flag reaches the step when no number would show it missing."""
    def spy(module):
        seen, real = [], module.make_train_step

        def wrapper(model, recipe, optimizer, mesh, batch_size, cfg, **kw):
            seen.append(cfg)
            return real(model, recipe, optimizer, mesh, batch_size, cfg, **kw)

        monkeypatch.setattr(module, "make_train_step", wrapper)
        return seen

    return spy
