"""Test-session settings shared by every test directory.

XLA:CPU spends most of a test's time compiling tiny programs; its lowest backend
optimisation level compiles them several times faster. Set before JAX initialises its
backend, so it applies to in-process tests and (through the environment) to the
binaries that end-to-end tests start. Benchmarks and real runs keep the defaults.
"""

import os

FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
