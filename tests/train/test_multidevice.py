"""8 simulated devices and 1 device give the same loss trajectory for the same global batch."""

from __future__ import annotations

import numpy as np

from tests.e2e_helpers import losses_by_step, run_binary

EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def test_eight_devices_match_one_device(tmp_path, tiny_args):
    common = tiny_args + ["--batch_size=16", "--train_steps=12"]
    run_binary("pretrain.py", common + ["--num_devices=1", f"--workdir={tmp_path / 'one'}"], env=EIGHT)
    run_binary("pretrain.py", common + ["--num_devices=8", f"--workdir={tmp_path / 'eight'}"], env=EIGHT)
    one, eight = losses_by_step(tmp_path / "one"), losses_by_step(tmp_path / "eight")
    assert sorted(one) == sorted(eight) == list(range(1, 13))
    a = np.array([one[s] for s in range(1, 13)])
    b = np.array([eight[s] for s in range(1, 13)])
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    assert np.ptp(a) > 1e-3  # the trajectory actually moves
