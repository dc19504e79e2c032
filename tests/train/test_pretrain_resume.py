"""Exact resume: straight runs and interrupted + resumed runs give bitwise-equal losses."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e_helpers import ROOT, TINY, child_env, losses_by_step, read_metrics, run_binary
from unidiff import corruption as uc
from unidiff.train.checkpoint import latest_step

# 20 steps, a checkpoint every 5: resumes from step 10 (clean stop) or wherever the
# newest complete checkpoint is (kill -9 part-way).
COMMON = TINY + ["--train_steps=20", "--ckpt_every=5"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """20 uninterrupted steps: the trajectory every interrupted run must reproduce."""
    workdir = tmp_path_factory.mktemp("straight")
    run_binary("pretrain.py", COMMON + [f"--workdir={workdir}"])
    return workdir


def test_resume_in_new_process_is_bitwise_exact(tmp_path, straight):
    split = tmp_path / "split"
    # The interrupted run keeps its compiled programs (every one, however quick to
    # compile) in a persistent cache, and the resumed process loads them from there: a
    # loaded train step must continue the straight run's trajectory bit for bit.
    cache = tmp_path / "xla_cache"
    common = COMMON + [f"--compilation_cache_dir={cache}"]
    env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    run_binary("pretrain.py", common + [f"--workdir={split}", "--stop_after=10"], env=env)
    assert max(losses_by_step(split)) == 10
    assert any(f.name.endswith("-cache") for f in cache.iterdir()), sorted(cache.iterdir())
    run_binary("pretrain.py", common + [f"--workdir={split}"], env=env)

    a, b = losses_by_step(straight), losses_by_step(split)
    assert sorted(a) == list(range(1, 21)) and sorted(b) == list(range(1, 21))
    for step in range(11, 21):
        assert a[step] == b[step], (step, a[step], b[step])
    # The resumed half is not trivially constant: training moved the loss.
    assert len({a[s] for s in range(11, 21)}) > 1


def test_resume_after_kill_9_is_bitwise_exact(tmp_path, straight):
    killed = tmp_path / "killed"
    common = COMMON

    env = child_env()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "experiments" / "pretrain.py"), *common,
         f"--workdir={killed}"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            # Past step 11, with the step-5 (or a later) checkpoint complete.
            if (metrics.exists() and len(metrics.read_text().splitlines()) >= 11
                    and latest_step(killed) is not None):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    logged_before = max(m["step"] for m in read_metrics(killed))
    assert logged_before < 20
    resume_from = latest_step(killed)  # what the rerun must resume from

    resumed = run_binary("pretrain.py", common + [f"--workdir={killed}"])
    assert f"at step {resume_from}" in resumed.stdout + resumed.stderr, "did not resume from the checkpoint"
    a, b = losses_by_step(straight), losses_by_step(killed)
    assert sorted(b) == list(range(1, 21)), "metrics.jsonl lost or duplicated steps"
    for step in range(1, 21):
        assert a[step] == b[step], (step, a[step], b[step])


def test_sigterm_saves_and_exits_zero(tmp_path, tiny_args):
    workdir = tmp_path / "term"
    env = child_env()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "experiments" / "pretrain.py"), *tiny_args,
         "--train_steps=100000", "--ckpt_every=100000", f"--workdir={workdir}"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and max(steps) >= 3

    # Continuing it: fewer steps than it has is refused before any work; changed training
    # flags are logged and the flags of the steps so far are kept beside the new ones.
    last = max(steps)
    short = run_binary("pretrain.py", [*tiny_args, "--train_steps=1", f"--workdir={workdir}"], check=False)
    assert short.returncode == 2 and f"already at step {last}" in short.stderr, short.stderr[-2000:]
    began = json.loads((workdir / "config.json").read_text())
    assert began["resolved"]["recipe"] == dataclasses.asdict(uc.recipes.get("umd"))
    assert began["resolved"]["model"]["image_size"] == 8
    assert began["resolved"]["num_devices"] == 1
    # As if the steps so far had run on 8 devices: each takes the same split, so batch 8's
    # 4 clean rows were 0 there. The resume on 1 device says the objective changed.
    began["resolved"]["num_devices"] = 8
    (workdir / "config.json").write_text(json.dumps(began))
    more = run_binary("pretrain.py", [*tiny_args, f"--train_steps={last + 1}", "--ckpt_every=100000",
                                      "--base_lr=2e-3", "--label_dropout=0.25", f"--workdir={workdir}"])
    assert ("changed flags (base_lr 0.001 -> 0.002, train_steps 100000 -> "
            f"{last + 1}, label_dropout 0.0 -> 0.25)") in more.stdout + more.stderr
    assert (f"resuming at step {last}: the steps so far ran on 8 devices with 0 clean (t = 0) rows "
            "per step; on 1 device the same batch 8 and r_t0 0.5 give 4") in more.stdout + more.stderr
    kept = json.loads((workdir / f"config.step{last}.json").read_text())
    now = json.loads((workdir / "config.json").read_text())
    assert kept == began and (kept["base_lr"], kept["train_steps"]) == (1e-3, 100000)
    assert (now["base_lr"], now["train_steps"]) == (2e-3, last + 1)
    assert now["resolved"]["recipe"]["label_dropout"] == 0.25 and now["resolved"]["num_devices"] == 1
    assert max(m["step"] for m in read_metrics(workdir)) == last + 1
