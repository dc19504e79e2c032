"""Helpers to run the training binaries in subprocesses on tiny synthetic data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A run small enough to compile and train in seconds on 2 CPU cores. The pico model
# (one encoder and one decoder block) traces and compiles in about half the time of the
# nano one; each binary started with it takes about 8 s instead of 11 s (20 steps, JAX's
# compilation cache warm).
TINY = [
    "--dataset=synthetic", "--image_size=8", "--model=P/2", "--batch_size=8",
    "--base_lr=1e-3", "--warmup_steps=5", "--log_every=1", "--seed=3",
]


# Test binaries compile the same tiny programs again and again: share JAX's persistent
# compilation cache between them (results are bitwise the same with or without it).
SUBPROCESS_ENV = {
    "JAX_PLATFORMS": "cpu",
    "JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(), "unidiff-test-jax-cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
}


def child_env(env: dict | None = None, fast_compile: bool = True) -> dict:
    """The environment for a test's child process: the session's, SUBPROCESS_ENV, then
    ``env``, whose XLA_FLAGS are added to the session's rather than replacing them;
    ``fast_compile=False`` drops the test-only XLA flags."""
    full_env = dict(os.environ)
    full_env.update(SUBPROCESS_ENV)
    if not fast_compile:
        full_env.pop("XLA_FLAGS", None)
    env = dict(env or {})
    if "XLA_FLAGS" in env:
        env["XLA_FLAGS"] = (full_env.get("XLA_FLAGS", "") + " " + env["XLA_FLAGS"]).strip()
    full_env.update(env)
    return full_env


def run_binary(name: str, args: list[str], env: dict | None = None, timeout: float = 300,
               check: bool = True, fast_compile: bool = True) -> subprocess.CompletedProcess:
    """Run ``experiments/<name>`` in ``child_env(env, fast_compile)``."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / name), *args],
        capture_output=True, text=True, env=child_env(env, fast_compile), timeout=timeout, cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(_failure(name, args, proc))
    return proc


def _failure(name: str, args: list[str], proc: subprocess.CompletedProcess) -> str:
    return (f"{name} {' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")


def communicate_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Wait for processes started together (with text pipes) and return their results;
    if one times out, none is left running."""
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return done


def run_binaries(runs: list[tuple[str, list[str]]], env: dict | None = None, timeout: float = 300,
                 fast_compile: bool = True) -> list[subprocess.CompletedProcess]:
    """Start ``experiments/<name> <args>`` for every run at once (independent runs, e.g.
    one per device layout: their single-threaded start-up and tracing overlap), wait for
    all, and fail naming the first that exited non-zero."""
    procs = [subprocess.Popen([sys.executable, str(ROOT / "experiments" / name), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=child_env(env, fast_compile), cwd=ROOT)
             for name, args in runs]
    done = communicate_all(procs, timeout)
    for (name, args), proc in zip(runs, done):
        if proc.returncode != 0:
            raise AssertionError(_failure(name, args, proc))
    return done


def read_metrics(workdir) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses_by_step(workdir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(workdir)}
