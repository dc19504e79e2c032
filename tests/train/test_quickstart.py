"""The README's main job: the quickstart pretraining finishes, in bounded memory, and learns.

Slow (minutes on 2 CPU cores): run with ``python -m pytest -m slow``. Its time is printed,
not asserted (speed is measured in benchmarks/); the 10-minute timeout only keeps a hung
run from blocking the suite.
"""

from __future__ import annotations

import resource
import time

import numpy as np
import pytest

from tests.e2e_helpers import read_metrics, run_binary


@pytest.mark.slow
def test_quickstart_finishes_and_loss_falls(tmp_path):
    start = time.monotonic()
    run_binary(
        "pretrain.py",
        ["--flagfile=experiments/configs/quickstart.flags", f"--workdir={tmp_path}"],
        fast_compile=False, timeout=600,
    )
    elapsed = time.monotonic() - start
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    metrics = read_metrics(tmp_path)
    losses = np.array([m["loss"] for m in metrics])
    print(f"quickstart: {elapsed:.0f} s, peak RSS {peak_gib:.2f} GiB, "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert peak_gib < 4.0
    # Visibly falls: the last logged loss is well under half the first.
    assert losses[-1] < 0.5 * losses[0]
    assert np.all(np.isfinite(losses))
