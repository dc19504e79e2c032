"""Every bad flag is rejected with a message naming it, before anything compiles."""

from __future__ import annotations

import json

import pytest

from tests.e2e_helpers import run_binary
from unidiff.train import loop
from unidiff.train.config import ConfigError, TrainConfig

BASE = dict(dataset="synthetic", image_size=8, model="N/2", batch_size=8, train_steps=2)

CASES = [
    (dict(m_t=1.0), "--m_t"),
    (dict(m_t0=1.5), "--m_t0"),
    (dict(r_t0=1.2), "--r_t0"),
    (dict(m_t=0.99), "m_t"),  # keeps 0 of the 16 tokens
    (dict(image_size=10, model="N/4"), "--image_size 10 is not divisible by the patch size 4"),
    (dict(model="Q/4"), "--model"),
    (dict(recipe="nope"), "--recipe"),
    (dict(dataset="imagenet64", data_dir="/nonexistent/dir"), "/nonexistent/dir"),
    (dict(dataset="folder"), "--data_dir"),
    (dict(train_steps=0), "--train_steps"),
    (dict(compute_dtype="float16"), "--compute_dtype"),
    (dict(num_devices=4), "--num_devices"),
    (dict(batch_size=0), "--batch_size"),
    (dict(ema_decay=1.0), "--ema_decay"),
]


@pytest.mark.parametrize("overrides,needle", CASES)
def test_bad_config_names_the_flag(tmp_path, overrides, needle):
    cfg = TrainConfig(workdir=str(tmp_path / "w"), **{**BASE, **overrides})
    with pytest.raises(ConfigError) as e:
        loop.prepare(cfg)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg
    assert not (tmp_path / "w").exists()


def test_good_config_prepares(tmp_path):
    run = loop.prepare(TrainConfig(workdir=str(tmp_path / "w"), **BASE))
    assert run.total_steps == 2 and run.num_devices == 1
    assert run.model_config.num_tokens == 16


def test_changing_model_under_existing_workdir_is_rejected(tmp_path):
    cfg = TrainConfig(workdir=str(tmp_path), **BASE)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_json()))
    loop.prepare(cfg)  # same flags: fine
    with pytest.raises(ConfigError, match="--model: 'N/4' differs from 'N/2'"):
        loop.prepare(TrainConfig(workdir=str(tmp_path), **{**BASE, "model": "N/4"}))


def test_cli_exits_2_with_one_error_line(tmp_path, tiny_args):
    proc = run_binary("pretrain.py", tiny_args + ["--train_steps=2", f"--workdir={tmp_path}",
                                                  "--m_t=1.0"], check=False)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert lines == ["pretrain.py: error: --m_t: mask ratio must be in [0, 1), got 1.0"], proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_cli_batch_not_divisible_by_devices(tmp_path, tiny_args):
    proc = run_binary(
        "pretrain.py", tiny_args + ["--batch_size=12", "--train_steps=2", f"--workdir={tmp_path}"],
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, check=False,
    )
    assert proc.returncode == 2
    assert "--batch_size 12 is not divisible by the 8 devices" in proc.stderr
