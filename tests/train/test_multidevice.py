"""8 simulated devices and 1 device give the same loss trajectory, gradient and update for
the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from tests.e2e_helpers import ROOT, child_env, communicate_all, losses_by_step, read_metrics, run_binaries

EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def test_eight_devices_match_one_device(tmp_path, tiny_args):
    """Also --microbatches: 2 devices x 4 chunks of 2 rows train like 1 device."""
    common = tiny_args + ["--batch_size=16", "--train_steps=12"]
    runs = {"one": ["--num_devices=1"], "eight": ["--num_devices=8"],
            "chunks": ["--num_devices=2", "--microbatches=4"]}
    run_binaries([("pretrain.py", common + flags + [f"--workdir={tmp_path / name}"])
                  for name, flags in runs.items()], env=EIGHT)
    one = losses_by_step(tmp_path / "one")
    assert sorted(one) == list(range(1, 13))
    a = np.array([one[s] for s in range(1, 13)])
    assert np.ptp(a) > 1e-3  # the trajectory actually moves
    g1 = [m["grad_norm"] for m in read_metrics(tmp_path / "one")]
    for name in ("eight", "chunks"):
        other = losses_by_step(tmp_path / name)
        assert sorted(other) == sorted(one), name
        b = np.array([other[s] for s in range(1, 13)])
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6, err_msg=name)
        # AdamW hardly sees a gradient scaled by the device count, so the losses alone
        # would miss it; the logged gradient norm does not.
        g = [m["grad_norm"] for m in read_metrics(tmp_path / name)]
        np.testing.assert_allclose(g, g1, rtol=2e-4, err_msg=name)


_SGD_STEP = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
from unidiff import corruption as uc, models as um
from unidiff.train.state import init_state
from unidiff.train.step import StepConfig, make_mesh, make_train_step, replicate, shard_batch
B = 16
# One small decoder for the architectures whose defaults are 512 wide and 8 deep.
small_decoder = dict(decoder_width=64, decoder_depth=1, decoder_heads=2)
# (devices, microbatches): the reference 1x1 first; UMD's 8 clean rows split evenly
# over every layout here, so all of them compute the same global-mean gradient.
UMD_LAYOUTS = ((1, 1), (2, 1), (8, 1), (1, 4), (1, 8), (2, 4))
LAYOUTS = ((1, 1), (8, 1), (2, 2))
ARCHS = {  # name: (model config, recipe, layouts)
    "umd": (um.umd_config("P/2", 8, 3), uc.recipes.umd(), UMD_LAYOUTS),
    # Frozen sin-cos tables (replicated constants) meet per-device activations in the
    # hand-written gradients of add_batch_shared and layer_norm.
    "dit": (um.dit_config("P/2", 8, 3, num_classes=0, output="x0_eps"), uc.recipes.dit(), LAYOUTS),  # as --arch=dit
    "mae": (um.mae_config("P/2", 8, 3, **small_decoder), uc.recipes.mae(), LAYOUTS),
    "maskdit": (um.maskdit_config("P/2", 8, 3, num_classes=0, **small_decoder), uc.recipes.maskdit(), LAYOUTS),
    "mdt": (um.mdt_config("P/2", 8, 3, num_classes=0, si_position=-1), uc.recipes.mdt(), LAYOUTS),
}
rng = np.random.default_rng(0)
batch = {"image": rng.uniform(-1, 1, (B, 8, 8, 3)).astype(np.float32), "label": np.zeros(B, np.int32)}
out = {}
for name in sys.argv[2].split(","):
    cfg, recipe, layouts = ARCHS[name]
    model = um.Model(cfg)
    p0 = jax.device_get(model.init(jax.random.key(0)))
    for d, m in layouts:
        mesh = make_mesh(d)
        opt = optax.sgd(1.0)  # the update is minus the gradient the step hands the optimizer
        state = replicate(init_state(jax.tree.map(jnp.asarray, p0), opt, jax.random.key(1), use_ema=False), mesh)
        step = make_train_step(model, recipe, opt, mesh, B,
                               StepConfig(patch_size=2, num_classes=0, microbatches=m))
        with jax.set_mesh(mesh):
            state, metrics = step(state, shard_batch(batch, mesh, B))
        upd = [np.asarray(a, np.float64) - b for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(p0))]
        out.setdefault(name, {})[f"{d}x{m}"] = {
            "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
            "update_norm": float(np.sqrt(sum(np.sum(u ** 2) for u in upd)))}
        np.save(f"{sys.argv[1]}/update_{name}_{d}x{m}.npy", np.concatenate([u.ravel() for u in upd]))
json.dump(out, sys.stdout)
"""


def test_gradient_is_the_mean_over_devices_not_the_sum(tmp_path):
    """One SGD step (lr 1) on 1, 2 and 8 devices, and with the rows accumulated over
    microbatches: the update is the same global-mean gradient, and its norm is the logged
    grad_norm. UMD on 1, 2 and 8 devices and 4 or 8 microbatches (one device) and 2 x 4;
    every other architecture (frozen tables, no adaLN, side-interpolater) on 1 and 8
    devices and 2 devices x 2 microbatches. Two processes, started together."""
    env = child_env({**EIGHT, "PYTHONPATH": str(ROOT)})
    groups = ["umd", "dit,mae,maskdit,mdt"]
    procs = [subprocess.Popen([sys.executable, "-c", _SGD_STEP, str(tmp_path), archs], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for archs in groups]
    out = {}
    for archs, proc in zip(groups, communicate_all(procs)):
        assert proc.returncode == 0, (archs, proc.stderr[-3000:])
        group = json.loads(proc.stdout)
        assert sorted(group) == sorted(archs.split(","))
        out.update(group)
    for name, runs in out.items():
        one = runs["1x1"]
        assert one["update_norm"] > 0, name
        np.testing.assert_allclose(one["update_norm"], one["grad_norm"], rtol=1e-5, err_msg=name)
        assert len(runs) >= 2, name
        for d in set(runs) - {"1x1"}:
            np.testing.assert_allclose(runs[d]["loss"], one["loss"], rtol=1e-5, err_msg=f"{name} on {d}")
            np.testing.assert_allclose(runs[d]["grad_norm"], one["grad_norm"], rtol=1e-4, err_msg=f"{name} on {d}")
            np.testing.assert_allclose(np.load(tmp_path / f"update_{name}_{d}.npy"),
                                       np.load(tmp_path / f"update_{name}_1x1.npy"),
                                       rtol=1e-3, atol=1e-7, err_msg=f"{name} on {d}")
