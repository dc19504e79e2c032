"""Two processes on localhost (CPU, jax.distributed) train together like one process."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.e2e_helpers import ROOT, child_env, losses_by_step, read_metrics, run_binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two(args: list[str], workdir, devices_per_process: int = 1,
               python_args: tuple[str, ...] = (),
               own_args: tuple[list[str], list[str]] = ([], [])) -> list[subprocess.Popen]:
    """pretrain.py as processes 0 and 1 of a localhost run (``python_args`` go before the
    script, e.g. ``-c`` and a harness that runs it; ``own_args[i]`` only to process i)."""
    port = _free_port()
    env = child_env()
    env["XLA_FLAGS"] = " ".join([f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
                                + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    return [
        subprocess.Popen(
            [sys.executable, *python_args, str(ROOT / "experiments" / "pretrain.py"), *args, *own_args[i],
             f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2", f"--process_id={i}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]


def _finish(procs: list[subprocess.Popen], check: bool = True) -> list[str]:
    """Their output; with ``check``, both must have exited 0."""
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=300)
        finally:
            if p.poll() is None:
                p.kill()
        outs.append(out)
    for p, out in zip(procs, outs):
        assert p.returncode == 0 or not check, out[-3000:]
    return outs


def test_two_processes_match_single_process_and_resume_on_other_devices(tmp_path, tiny_args):
    """Two processes train as one. A checkpoint restores on another device count per
    process, and one process reads its parameters; it resumes only under as many
    processes as wrote it (before, both failed at the restore, blamed on damaged files)."""
    common = tiny_args + ["--batch_size=8", "--train_steps=8"]
    run_binary("pretrain.py", common + [f"--workdir={tmp_path / 'single'}"])

    multi = tmp_path / "multi"
    outs = _finish(_start_two(common + ["--stop_after=4"], multi, devices_per_process=1))
    assert "2 devices" in outs[0]
    outs = _finish(_start_two(common, multi, devices_per_process=2))
    assert "resumed from" in outs[0] and "4 devices" in outs[0], outs[0][-3000:]

    single, steps = losses_by_step(tmp_path / "single"), losses_by_step(multi)
    assert sorted(single) == sorted(steps) == list(range(1, 9))
    np.testing.assert_allclose(
        [single[s] for s in range(1, 9)], [steps[s] for s in range(1, 9)], rtol=2e-4, atol=1e-6
    )

    from unidiff.train.checkpoint import restore_params

    params, step = restore_params(str(multi))  # here: one process
    ref, _ = restore_params(str(tmp_path / "single"))
    assert step == 8
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-5)

    proc = run_binary("pretrain.py", common[:-1] + ["--train_steps=12", f"--workdir={multi}"],
                      check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "--num_processes 1: checkpoint step 8" in lines[0], lines
    assert "resume it with 2 processes (--num_processes=2)" in lines[0], lines


def test_sigterm_to_one_process_stops_both_at_one_saved_step(tmp_path, tiny_args):
    """Each process read its own stop flag: one that saw SIGTERM saved and left while the
    other waited in the step's collectives (a gloo abort, no checkpoint)."""
    workdir = tmp_path / "w"
    procs = _start_two(tiny_args + ["--batch_size=8", "--train_steps=100000", "--log_every=1"],
                       workdir)
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (
            metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert all(p.poll() is None for p in procs), [p.communicate()[0][-2000:] for p in procs]
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)
    outs = _finish(procs)
    saved = [re.search(r"signal 15: saved step (\d+), exiting", out) for out in outs]
    assert all(saved), [out[-2000:] for out in outs]
    step = int(saved[0].group(1))
    assert int(saved[1].group(1)) == step >= 3
    assert os.path.isdir(workdir / "checkpoints" / str(step))


def _dist_flags(**kw):
    from types import SimpleNamespace

    return SimpleNamespace(**{"coordinator_address": None, "num_processes": None,
                              "process_id": None, "distributed_auto": False, **kw})


@pytest.mark.parametrize("kw,needle", [
    # A malformed address was an IndexError traceback from inside jax.distributed.
    (dict(coordinator_address="badaddress", num_processes=1, process_id=0), "--coordinator_address: expected host:port"),
    (dict(coordinator_address="host:99999", num_processes=1, process_id=0), "--coordinator_address"),
    (dict(coordinator_address=":1234", num_processes=1, process_id=0), "--coordinator_address"),
    (dict(coordinator_address="h:1234", num_processes=2), "needs --num_processes and --process_id"),
    # Reported as '--process_id 0 must be in [0, --num_processes 0)'.
    (dict(coordinator_address="h:1234", num_processes=0, process_id=0), "--num_processes: must be >= 1"),
    (dict(coordinator_address="h:1234", num_processes=2, process_id=2), "--process_id 2 must be in [0"),
    (dict(num_processes=2), "need --coordinator_address"),
    # --distributed_auto silently ignored the explicit flags.
    (dict(distributed_auto=True, coordinator_address="h:1234", num_processes=2, process_id=0),
     "--distributed_auto reads"),
])
def test_bad_distributed_flags_are_named(kw, needle):
    from unidiff.train import cli

    with pytest.raises(ValueError, match=re.escape(needle)):
        cli.check_distributed_flags(_dist_flags(**kw))


def test_good_distributed_flags_pass():
    from unidiff.train import cli

    cli.check_distributed_flags(_dist_flags())
    cli.check_distributed_flags(_dist_flags(distributed_auto=True))
    cli.check_distributed_flags(_dist_flags(coordinator_address="10.0.0.1:1234", num_processes=2,
                                            process_id=1))
    cli.check_distributed_flags(_dist_flags(coordinator_address="[::1]:1234", num_processes=1,
                                            process_id=0))


def test_num_devices_below_all_devices_of_a_multi_process_run_is_refused(tmp_path, tiny_args):
    """The mesh took the first --num_devices devices, all process 0's: the run wrote its
    workdir and then died in shard_batch with a traceback."""
    workdir = tmp_path / "w"
    procs = _start_two(tiny_args + ["--batch_size=8", "--train_steps=2", "--num_devices=2"],
                       workdir, devices_per_process=2)
    for p, out in zip(procs, _finish(procs, check=False)):
        errors = [line for line in out.splitlines() if line.startswith("pretrain.py: error")]
        assert p.returncode == 2, out[-3000:]
        assert len(errors) == 1 and "--num_devices 2: a run of 2 processes uses all 4" in errors[0], out[-3000:]
    assert not workdir.exists()


@pytest.mark.parametrize("own,errors", [
    # process 1 with another seed and learning rate trained on, inconsistently
    (([], ["--seed=4", "--base_lr=2e-3"]),
     ["--base_lr, --seed: differ between the processes of this run (process 1 against process 0; "
      "this one has base_lr=0.001, seed=3)",
      "--base_lr, --seed: differ between the processes of this run (process 1 against process 0; "
      "this one has base_lr=0.002, seed=4)"]),
    # process 1 refused its flag and exited; process 0 waited for it in the first collective
    (([], ["--num_workers=-1"]),
     ["process 1 of 2 refused the flags (see its log); every process stops",
      "--num_workers: must be >= 0"]),
], ids=["flags_differ", "one_refuses"])
def test_processes_agree_on_their_flags_before_training(tmp_path, tiny_args, own, errors):
    workdir = tmp_path / "w"
    procs = _start_two(tiny_args + ["--batch_size=8", "--train_steps=2"], workdir, own_args=own)
    for p, out, error in zip(procs, _finish(procs, check=False), errors):
        lines = [line for line in out.splitlines() if line.startswith("pretrain.py: error")]
        assert p.returncode == 2, out[-3000:]
        assert len(lines) == 1 and error in lines[0], out[-3000:]
    assert not workdir.exists()


# Runs pretrain.py with one process failing alone: process 1's loader at its third batch
# ("data"), as a folder whose images all became unreadable would; or process 0's metrics
# line of step 2 ("metrics"), as on a full disk. Every loader also reports (process index
# + 1) skipped images per batch read, so the metrics' skipped_images at step s (their sum
# over the processes) is 3 s.
_FAILING = """
import runpy, sys
import jax
from unidiff import data as ud
from unidiff.data import loader

# Patched on the class: Grain's checkpoint handler saves only its own iterator types.
next_batch = loader.DataIterator.__next__
what = sys.argv[1]

def counting_next(self):
    self.calls = getattr(self, "calls", 0) + 1
    if what == "data" and jax.process_index() == 1 and self.calls == 3:
        raise ud.DataError("every example of an epoch in a row was unreadable")
    return next_batch(self)

loader.DataIterator.__next__ = counting_next
loader.DataIterator.num_skipped = property(
    lambda self: (jax.process_index() + 1) * getattr(self, "calls", 0))
if what == "metrics":  # process 0's metrics line of step 2 meets a full disk
    import json
    from unidiff.train import loop

    class FullDisk:
        def __getattr__(self, name):
            return getattr(json, name)
        def dumps(self, obj, **kwargs):
            if jax.process_index() == 0 and isinstance(obj, dict) and obj.get("step") == 2:
                raise OSError(28, "No space left on device")
            return json.dumps(obj, **kwargs)

    loop.json = FullDisk()
sys.argv = sys.argv[2:]  # the script and its flags
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("what", ["data", "metrics"])
def test_a_failure_on_one_process_stops_all_of_them(tmp_path, tiny_args, what):
    """A process that could not read its data, or process 0 failing to write a metrics
    line, raised alone; the others waited in the next step's collectives until JAX's
    timeouts ended them minutes later."""
    procs = _start_two([*tiny_args, "--batch_size=8", "--train_steps=6"], tmp_path / "w",
                       python_args=("-c", _FAILING, what))
    outs = _finish(procs, check=False)
    errors = [[line for line in out.splitlines() if line.startswith("pretrain.py: error")]
              for out in outs]
    assert [p.returncode for p in procs] == [1, 1], [out[-2000:] for out in outs]
    failed, other = (1, 0) if what == "data" else (0, 1)
    assert len(errors[failed]) == 1, outs[failed][-2000:]
    assert ("at step 3: every example of an epoch" if what == "data" else
            "writing the run failed (No space left on device)") in errors[failed][0], errors
    assert len(errors[other]) == 1, outs[other][-2000:]
    assert f"stopping before step 3: process {failed} of 2 failed" in errors[other][0], errors
    # Step 2's line is the one that met the full disk.
    metrics = read_metrics(tmp_path / "w")
    assert [m["step"] for m in metrics] == ([1, 2] if what == "data" else [1])
    # Process 0's count alone was logged: 1 s.
    assert [m["skipped_images"] for m in metrics] == [3 * m["step"] for m in metrics]


# agreed_preparation's logic in one process: jax.process_count() faked to 2 and the
# all-gather to stack this process's row over the row another process would send.
def _fake_two_processes(monkeypatch, other_row=None):
    from jax.experimental import multihost_utils

    from unidiff.train import loop

    sent = []

    def allgather(row):
        sent.append(np.asarray(row))
        return np.stack([np.asarray(row), np.asarray(row) if other_row is None else other_row])

    monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    return sent


def _row_sent_by(monkeypatch, cfg):
    from unidiff.train import loop

    sent = _fake_two_processes(monkeypatch)
    with loop.agreed_preparation() as agreed:
        agreed.cfg = cfg
    return sent[-1]


def test_agreed_preparation_lets_only_data_dir_and_num_workers_differ(monkeypatch):
    """Each process may mount its copy of the data elsewhere and read it with its own
    number of workers; any other flag that differs stops every process."""
    import dataclasses

    from unidiff.train import loop
    from unidiff.train.config import ConfigError, TrainConfig

    mine = TrainConfig(workdir="/w", data_dir="/mnt/a", num_workers=2, seed=3)
    other = _row_sent_by(monkeypatch, dataclasses.replace(mine, data_dir="/mnt/b", num_workers=8))
    _fake_two_processes(monkeypatch, other)
    with loop.agreed_preparation() as agreed:
        agreed.cfg = mine
    other = _row_sent_by(monkeypatch, dataclasses.replace(mine, seed=4, num_workers=8))
    _fake_two_processes(monkeypatch, other)
    with pytest.raises(ConfigError, match=r"^--seed: differ between the processes"):
        with loop.agreed_preparation() as agreed:
            agreed.cfg = mine


def test_agreed_preparation_without_cfg_is_a_refusal_the_others_see(monkeypatch):
    """A block that raised nothing but set no .cfg is a refusal: the process still sends
    its row, marked failed, so the others stop too, and raises ConfigError (not a
    TypeError from hashing the flags of no config)."""
    from unidiff.train import loop
    from unidiff.train.config import ConfigError

    sent = _fake_two_processes(monkeypatch)
    with pytest.raises(ConfigError, match="did not set .cfg"):
        with loop.agreed_preparation():
            pass
    assert len(sent) == 1 and sent[0][0] == 1 and not sent[0][1:].any()
