"""The paper configs under experiments/configs/: each documents its own command and the
paper's expected result, and each pretraining flagfile passes pretrain.py's full
validation (flags, data format, model, recipe, batch split) on a tiny stand-in dataset of
its format, building the model and recipe its header describes."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.e2e_helpers import ROOT
from unidiff.train.config import TrainConfig

CONFIGS = sorted((ROOT / "experiments" / "configs").glob("*.flags"))
FIELDS = {f for f in TrainConfig.__dataclass_fields__}


def _flag_lines(path):
    return [line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _header(path):
    return "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_documents_its_command_and_expected_result(path):
    header = _header(path)
    binary = "finetune.py" if any(a.startswith("--init_from=") for a in _flag_lines(path)) else "pretrain.py"
    assert re.search(r"^# Command\b.*:", header, re.M), "a \"# Command:\" line"
    assert f"python experiments/{binary} --flagfile=experiments/configs/{path.name}" in header
    assert re.search(r"[Ee]xpected", header), "the header must say what result to expect"
    for line in _flag_lines(path):
        m = re.fullmatch(r"--(no)?([a-z_0-9]+)(=.*)?", line)
        assert m, f"{path.name}: {line!r} is not a --flag=value line"
        assert m.group(2) in FIELDS, f"{path.name}: --{m.group(2)} is not a training flag"


# Parses each flagfile with pretrain.py's own flag definitions and runs loop.prepare,
# all in one process (absl's flags are global, so not in the test process).
_PREPARE = r"""
import importlib.util, json, sys
from absl import flags
spec = importlib.util.spec_from_file_location("pretrain_binary", "experiments/pretrain.py")
spec.loader.exec_module(importlib.util.module_from_spec(spec))
from unidiff.models import check_transfer, dit_config
from unidiff.models.config import count_params
from unidiff.train import cli, loop
FLAGS = flags.FLAGS
out = {}
for name, data_dir, workdir in json.loads(sys.argv[1]):
    FLAGS.unparse_flags()
    args = ["pretrain.py", f"--flagfile=experiments/configs/{name}", f"--workdir={workdir}"]
    FLAGS(args + ([f"--data_dir={data_dir}"] if data_dir else []))
    run = loop.prepare(cli.config_from_flags(FLAGS))
    mc = run.model_config
    out[name] = dict(
        recipe={k: getattr(run.recipe, k) for k in ("name", "r_t0", "m_t0", "m_t", "schedule",
                                                   "label_dropout", "norm_pix_loss")},
        model=dict(width=mc.width, depth=mc.depth, decoder_depth=mc.decoder_depth,
                   dec_width=mc.dec_width, patch=mc.patch_size, image_size=mc.image_size,
                   channels=mc.in_channels, num_classes=mc.num_classes,
                   side_interpolater=mc.side_interpolater, adaln=mc.adaln),
        params=count_params(mc), arch=run.cfg.resolved_arch(),
        batch=run.cfg.batch_size, peak_lr=run.cfg.base_lr * run.cfg.batch_size / 256,
        min_lr=run.cfg.min_lr, warmup=run.warmup_steps, total=run.total_steps,
        weight_decay=run.cfg.weight_decay, grad_clip=run.cfg.grad_clip, b2=run.cfg.b2,
        ema=run.cfg.ema_decay)
    if run.recipe.r_t0 == 1:  # a clean-only pretraining: can it initialise a DiT (USP)?
        dit = dit_config(run.cfg.model, mc.image_size, mc.in_channels, num_classes=1000,
                         output="x0_eps", norm_affine=True)
        try:
            check_transfer(mc, dit)
            out[name]["transfer"] = "ok"
        except ValueError as e:
            out[name]["transfer"] = str(e)
print(json.dumps(out))
"""


def _imagenet64(root):
    """One train batch and the val file in the official layout (labels 1-based, 1000 classes)."""
    rng = np.random.default_rng(0)
    for name in ("train_data_batch_1.npz", "val_data.npz"):
        np.savez(root / name, data=rng.integers(0, 256, (4, 3 * 64 * 64), np.uint8),
                 labels=[1, 2, 1000, 7])
    return root


def _latents(root):
    """SD-VAE-shaped latents of 256x256 images: (N, 32, 32, 4) float32, 1000 classes."""
    (root / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(root / "train" / "latents.npy", rng.standard_normal((4, 32, 32, 4)).astype(np.float32))
    np.save(root / "train" / "labels.npy", np.array([0, 1, 999, 5]))
    return root


def test_pretraining_configs_pass_validation_and_build_what_they_say(tmp_path):
    (tmp_path / "in64").mkdir()
    data = {"imagenet64": _imagenet64(tmp_path / "in64"), "latents": _latents(tmp_path / "lat"),
            "digits": None}
    cases = []
    for path in CONFIGS:
        lines = _flag_lines(path)
        if any(a.startswith("--init_from=") for a in lines):
            continue  # a finetune flagfile needs its pretraining's checkpoint
        dataset = next(a.split("=", 1)[1] for a in lines if a.startswith("--dataset="))
        cases.append((path.name, str(data[dataset]) if data[dataset] else None,
                      str(tmp_path / "work" / path.stem)))
    proc = subprocess.run([sys.executable, "-c", _PREPARE, json.dumps(cases)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(got) == sorted(name for name, _, _ in cases)

    # The UMD paper's ImageNet-64 runs: B/4 on 64x64, the recipes of UMD Table 1, peak LR
    # 1.5e-4 x batch / 256 (REFERENCE §1, §6).
    table1 = {"umd_b4_in64.flags": ("umd", 0.5, 0.75, 0.375), "dit_b4_in64.flags": ("dit", 0.0, None, 0.0),
              "maskdit_b4_in64.flags": ("maskdit", 0.0, None, 0.5), "mae_b4_in64.flags": ("mae", 1.0, 0.75, None)}
    for name, (recipe, r_t0, m_t0, m_t) in table1.items():
        c = got[name]
        assert c["recipe"]["name"] == recipe and c["recipe"]["r_t0"] == r_t0
        if m_t0 is not None:
            assert c["recipe"]["m_t0"] == m_t0
        if m_t is not None:
            assert c["recipe"]["m_t"] == m_t
        assert c["recipe"]["schedule"] == "cosine"  # pixels
        assert (c["model"]["width"], c["model"]["depth"], c["model"]["decoder_depth"],
                c["model"]["patch"], c["model"]["image_size"]) == (768, 12, 4, 4, 64)
        assert c["model"]["adaln"] == (recipe != "mae")
        assert c["peak_lr"] == pytest.approx(1.5e-4 * c["batch"] / 256)
        assert c["weight_decay"] == 0.05 and c["b2"] == 0.95

    # MDT-S/2 (MDT Sec. 5.1): 12 blocks split 10 + 2 around the side-interpolater, mask 0.3,
    # linear schedule on 32x32x4 latents, constant 3e-4 at batch 256, no weight decay.
    mdt = got["mdt_s2_in256.flags"]
    assert mdt["arch"] == "mdt" and mdt["model"]["side_interpolater"]
    assert (mdt["model"]["width"], mdt["model"]["depth"] + mdt["model"]["decoder_depth"],
            mdt["model"]["decoder_depth"], mdt["model"]["patch"], mdt["model"]["image_size"],
            mdt["model"]["channels"], mdt["model"]["num_classes"]) == (384, 12, 2, 2, 32, 4, 1000)
    assert mdt["recipe"]["name"] == "mdt" and mdt["recipe"]["m_t"] == 0.3
    assert mdt["recipe"]["schedule"] == "linear" and mdt["recipe"]["label_dropout"] == 0.1
    assert mdt["batch"] == 256 and mdt["peak_lr"] == pytest.approx(3e-4) == mdt["min_lr"]
    assert mdt["warmup"] == 0 and mdt["weight_decay"] == 0 and mdt["grad_clip"] <= 0
    assert mdt["total"] == 400_000 and mdt["ema"] == 0.9999

    # USP (USP Sec. 3-4): MAE B/2 with the 512-wide 8-block decoder, mask 0.75, per-patch
    # normalised loss, peak 2.4e-3 at batch 4096; its encoder must fill a DiT-B/2.
    usp = got["usp_b2_in256.flags"]
    assert usp["arch"] == "mae" and usp["recipe"]["name"] == "usp"
    assert usp["recipe"]["r_t0"] == 1.0 and usp["recipe"]["m_t0"] == 0.75 and usp["recipe"]["norm_pix_loss"]
    assert (usp["model"]["width"], usp["model"]["depth"], usp["model"]["dec_width"],
            usp["model"]["decoder_depth"], usp["model"]["patch"], usp["model"]["channels"]) == (768, 12, 512, 8, 2, 4)
    assert usp["batch"] == 4096 and usp["peak_lr"] == pytest.approx(2.4e-3)
    assert usp["warmup"] == int(40 * 1_281_167 / 4096)
    assert usp["transfer"] == "ok", usp["transfer"]
    assert usp["model"]["num_classes"] == 0  # unconditional, as MAE
