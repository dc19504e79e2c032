"""``checkpoint.restore_params``: the parameters the finetune, sample and probe binaries
load. Its docstring: the EMA parameters of the latest step when the run kept them and
``use_ema`` is set, the raw ones otherwise. Checked against states with known, tiny
parameters saved through the train loop's own ``Checkpointer``: the EMA differs from
the raw parameters in every element, and an older step holds other values still.
"""

from __future__ import annotations

import json
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.e2e_helpers import ROOT, child_env
from unidiff.train.checkpoint import Checkpointer, latest_step, restore_params
from unidiff.train.state import init_state

RAW = {"encoder": {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
                   "b": np.array([0.5, -1.0, 2.0], np.float32)},
       "head": {"w": np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(4, 2)}}


def _ema_of(params):
    return jax.tree.map(lambda a: -3.0 * a + 7.25, params)  # differs from a everywhere


def _save(workdir, states: dict) -> None:
    """Save ``{step: TrainState}`` into ``workdir`` as the train loop does."""
    ckpt = Checkpointer(str(workdir))
    try:
        for step, state in states.items():
            data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
            assert ckpt.save(step, state, data_iter, force=True)
    finally:
        ckpt.close()


def _state(params, use_ema: bool):
    state = init_state(jax.tree.map(jnp.asarray, params), optax.adam(1e-3), jax.random.key(0),
                       use_ema)
    if use_ema:
        state = state._replace(ema_params=jax.tree.map(jnp.asarray, _ema_of(params)))
    return state


def _assert_tree_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.fixture(scope="module")
def ema_workdir(tmp_path_factory):
    """Steps 2 and 5 of a run with EMA on; step 2's values are RAW + 100."""
    workdir = tmp_path_factory.mktemp("ema_run")
    older = jax.tree.map(lambda a: a + 100.0, RAW)
    _save(workdir, {2: _state(older, True), 5: _state(RAW, True)})
    return workdir


def test_use_ema_returns_the_ema_params_of_the_latest_step(ema_workdir):
    params, step = restore_params(str(ema_workdir), use_ema=True)
    assert step == 5
    _assert_tree_equal(params, _ema_of(RAW))


def test_use_ema_false_returns_the_raw_params(ema_workdir):
    params, step = restore_params(str(ema_workdir), use_ema=False)
    assert step == 5
    _assert_tree_equal(params, RAW)


@pytest.mark.parametrize("use_ema", [True, False])
def test_run_without_ema_returns_the_raw_params(tmp_path, use_ema):
    _save(tmp_path, {3: _state(RAW, False)})
    params, step = restore_params(str(tmp_path), use_ema=use_ema)
    assert step == 3
    _assert_tree_equal(params, RAW)


def test_no_checkpoint_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        restore_params(str(tmp_path))


def test_reading_a_missing_workdir_creates_nothing(tmp_path):
    """A mistyped --workdir of sample.py, probe.py or a finetune's pretraining is an
    error, not a reason to create ``<workdir>/checkpoints`` (orbax's manager creates its
    directory unless told not to)."""
    missing = tmp_path / "typo"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        restore_params(str(missing))
    assert not missing.exists()
    assert latest_step(str(missing)) is None and not missing.exists()


_READ_DAMAGED = r"""
import json, sys
import grain, jax
from unidiff.train.checkpoint import CheckpointReadError, Checkpointer, restore_params
from tests.train.test_checkpoint_params import RAW, _state
out = {}
try:
    restore_params(sys.argv[1])
except CheckpointReadError as e:
    out["restore_params"] = str(e)
ckpt = Checkpointer(sys.argv[1])
try:
    ckpt.restore(jax.eval_shape(lambda: _state(RAW, True)), iter(grain.MapDataset.range(4).to_iter_dataset()))
except CheckpointReadError as e:
    out["Checkpointer.restore"] = str(e)
finally:
    ckpt.close()
print(json.dumps(out))
"""


def test_damaged_checkpoint_is_one_line_naming_the_step(tmp_path):
    """Truncated array files: orbax and tensorstore raise pages of nested specs; the
    reader and the train loop's restore both say which step and what to do, in one line.
    (Read in a subprocess: orbax's failed asynchronous reads leave callbacks that hit a
    closed event loop when they are collected, a warning in whatever test runs then.)"""
    _save(tmp_path, {4: _state(RAW, True)})
    data_files = [p for p in (tmp_path / "checkpoints" / "4" / "state").rglob("*")
                  if p.is_file() and p.parent.name == "d"]
    assert data_files
    for p in data_files:
        p.write_bytes(p.read_bytes()[:10])
    proc = subprocess.run([sys.executable, "-c", _READ_DAMAGED, str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=child_env({"PYTHONPATH": str(ROOT)}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(out) == ["Checkpointer.restore", "restore_params"]
    step_dir = str(tmp_path / "checkpoints" / "4")
    for where, msg in out.items():
        assert msg.startswith(f"{step_dir}: cannot read this checkpoint"), (where, msg)
        assert "\n" not in msg and msg.endswith("its files are damaged: it is the only checkpoint"), (where, msg)
