"""``checkpoint.restore_params``: the parameters the finetune, sample and probe binaries
load. Its docstring: the EMA parameters of the latest step when the run kept them and
``use_ema`` is set, the raw ones otherwise. Checked against states with known, tiny
parameters saved through the train loop's own ``Checkpointer``: the EMA differs from
the raw parameters in every element, and an older step holds other values still.
"""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unidiff.train.checkpoint import CheckpointReadError, Checkpointer, restore_params
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


def test_damaged_checkpoint_is_one_line_naming_the_step(tmp_path):
    """Truncated array files: orbax and tensorstore raise pages of nested specs; the
    reader and the train loop's restore both say which step and what to do, in one line."""
    _save(tmp_path, {4: _state(RAW, True)})
    data_files = [p for p in (tmp_path / "checkpoints" / "4" / "state").rglob("*")
                  if p.is_file() and p.parent.name == "d"]
    assert data_files
    for p in data_files:
        p.write_bytes(p.read_bytes()[:10])
    step_dir = str(tmp_path / "checkpoints" / "4")
    with pytest.raises(CheckpointReadError) as e:
        restore_params(str(tmp_path))
    assert str(e.value).startswith(f"{step_dir}: cannot read this checkpoint") and "\n" not in str(e.value)
    ckpt = Checkpointer(str(tmp_path))
    try:
        abstract = jax.eval_shape(lambda: _state(RAW, True))
        with pytest.raises(CheckpointReadError, match="move that step's directory out of the way"):
            ckpt.restore(abstract, iter(grain.MapDataset.range(4).to_iter_dataset()))
    finally:
        ckpt.close()
