"""Every bad flag exits non-zero with a one-line message naming it, before compiling."""

from __future__ import annotations

import pytest

from tests.e2e_helpers import run_binary

CASES = [
    (["--m_t=1.0"], "--m_t"),
    (["--m_t0=1.5"], "--m_t0"),
    (["--batch_size=7", "--num_devices=1"], None),  # 7 is fine on 1 device: control case
    (["--image_size=10", "--model=N/4"], "--image_size"),
    (["--model=Q/4"], "--model"),
    (["--recipe=nope"], "--recipe"),
    (["--dataset=imagenet64", "--data_dir=/nonexistent/dir"], "/nonexistent/dir"),
    (["--dataset=folder"], "--data_dir"),
    (["--train_steps=0"], "--train_steps"),
    (["--compute_dtype=float16"], "--compute_dtype"),
]


@pytest.mark.parametrize("extra,needle", CASES)
def test_bad_flag_is_rejected_with_one_line(tmp_path, tiny_args, extra, needle):
    workdir = tmp_path / "w"
    # absl keeps the last value of a repeated flag, so `extra` overrides the defaults.
    args = tiny_args + ["--train_steps=2", f"--workdir={workdir}"] + extra
    proc = run_binary("pretrain.py", args, check=False)
    if needle is None:
        assert proc.returncode == 0, proc.stderr[-2000:]
        return
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert needle in lines[0], lines[0]
    # Rejected before anything was trained or written.
    assert not (workdir / "checkpoints").exists()
    assert "step 1/" not in proc.stdout


def test_batch_not_divisible_by_devices(tmp_path, tiny_args):
    proc = run_binary(
        "pretrain.py", tiny_args + ["--batch_size=12", "--train_steps=2", f"--workdir={tmp_path}"],
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, check=False,
    )
    assert proc.returncode == 2
    assert "--batch_size 12 is not divisible by the 8 devices" in proc.stderr


def test_changing_model_under_existing_workdir_is_rejected(tmp_path, tiny_args):
    run_binary("pretrain.py", tiny_args + ["--train_steps=2", f"--workdir={tmp_path}"])
    proc = run_binary("pretrain.py", tiny_args + ["--model=N/4", "--train_steps=4",
                                                   f"--workdir={tmp_path}"], check=False)
    assert proc.returncode == 2 and "--model" in proc.stderr
    # The existing checkpoint is untouched.
    assert (tmp_path / "checkpoints" / "2").is_dir()
