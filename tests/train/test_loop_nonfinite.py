"""The train loop stops after --max_nonfinite consecutive skipped steps, at the step that
reached the limit, with nothing logged or checkpointed past it.

The loop reads a step's non-finite count only after it has fetched the next batch (so
loading overlaps the step), or at once when the step is to be logged or saved; both
paths are checked here. Parameters full of NaN make every step non-finite.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from unidiff.train import checkpoint as ckpt_lib
from unidiff.train import loop
from unidiff.train.config import TrainConfig

BASE = dict(dataset="synthetic", image_size=8, model="P/2", batch_size=8, train_steps=20,
            warmup_steps=1)


def _nan_params(model, key):
    return jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), jax.jit(model.init)(key))


@pytest.mark.parametrize("max_nonfinite,ckpt_every,log_every,saved,logged", [
    (3, 2, 10, 2, []),    # step 3 is neither logged nor saved: read before step 4 is dispatched
    (4, 2, 1, 2, [1, 2, 3]),  # step 4 is saved and logged: read first, neither happens
    (2, 5, 10, None, []),  # no checkpoint before the limit
])
def test_stops_at_the_step_that_reached_the_limit(tmp_path, max_nonfinite, ckpt_every, log_every,
                                                  saved, logged):
    cfg = TrainConfig(workdir=str(tmp_path / "w"), max_nonfinite=max_nonfinite,
                      ckpt_every=ckpt_every, log_every=log_every, **BASE)
    run = loop.prepare(cfg)
    with pytest.raises(loop.TrainingError) as e:
        loop.train(run, init_params=_nan_params)
    msg = str(e.value)
    assert msg.startswith(f"stopping at step {max_nonfinite}: {max_nonfinite} consecutive steps "
                          "with a non-finite loss or gradient norm"), msg
    if saved is None:
        assert "no checkpoint was saved before them" in msg
    else:
        assert f"the last good checkpoint is step {saved} in " in msg
    assert ckpt_lib.latest_step(cfg.workdir) == saved
    lines = (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == logged
    assert all(r["nonfinite_total"] == r["step"] for r in records)
