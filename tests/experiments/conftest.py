"""Tiny pretrain -> finetune workdirs shared by the experiment-binary tests (built once)."""

import pytest

from tests.e2e_helpers import TINY, run_binary


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory):
    """A 4-step unconditional UMD pretraining run on 8x8 synthetic images (no EMA)."""
    workdir = tmp_path_factory.mktemp("exp") / "pre"
    run_binary("pretrain.py", [*TINY, "--train_steps=4", f"--workdir={workdir}"])
    return workdir


@pytest.fixture(scope="session")
def tiny_finetuned(tiny_pretrained, tmp_path_factory):
    """3 class-conditional finetune steps from ``tiny_pretrained`` (EMA on), a checkpoint
    after each: warmed up from lr 0, step 1 holds the initial parameters unchanged."""
    workdir = tmp_path_factory.mktemp("exp") / "ft"
    run_binary("finetune.py", [
        "--dataset=synthetic", "--batch_size=8", "--base_lr=1e-3", "--warmup_steps=1",
        "--log_every=1", "--train_steps=3", "--ema_decay=0.5", "--seed=3", "--ckpt_every=1",
        f"--init_from={tiny_pretrained}", f"--workdir={workdir}",
    ])
    return workdir
