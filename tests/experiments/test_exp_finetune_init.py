"""experiments/finetune.py starts from the pretrained parameters (UMD sec. 4).

``unidiff.train.checkpoint.merge_pretrained`` takes every pretrained leaf whose path and shape match the fresh
model's and keeps the fresh leaf otherwise (the new label embedding). Checked as a unit
on hand-made trees and end to end: the finetuned run's parameters at step 1 (its lr is
0 there, warmed up from 0) are the pretrained checkpoint's, read back from its files,
and its label embedding is the fresh initialisation's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from tests.e2e_helpers import ROOT, TINY, child_env, read_metrics, run_binary
from unidiff.train.checkpoint import ITEMS, Checkpointer, checkpoint_dir, merge_pretrained
from unidiff.train.config import INHERITED, ConfigError, TrainConfig
from unidiff.train.state import init_state
from unidiff.train.workdir import inherited_flags


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _read_state(workdir, step: int) -> dict:
    """The saved TrainState of ``step`` as a dict, read with orbax directly."""
    mngr = ocp.CheckpointManager(checkpoint_dir(str(workdir)), item_names=ITEMS)
    try:
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        mngr.close()
    return state["state"]


def test_merge_pretrained_takes_matching_leaves_and_keeps_the_rest_fresh():
    rng = np.random.default_rng(0)
    fresh = {"encoder": {"w": rng.normal(size=(2, 3)).astype(np.float32),
                         "b": np.zeros(3, np.float32)},
             "label_embed": {"embeddings": rng.normal(size=(11, 4)).astype(np.float32)},
             "head": {"w": rng.normal(size=(4, 5)).astype(np.float32)}}
    pretrained = {"encoder": {"w": rng.normal(size=(2, 3)),  # float64: cast to the fresh dtype
                              "b": np.array([1.0, -2.0, 3.0], np.float32)},
                  "head": {"w": rng.normal(size=(4, 6)).astype(np.float32)},  # other shape
                  "decoder_only": {"w": np.ones((2, 2), np.float32)}}  # not in the new model
    merged, new = merge_pretrained(fresh, pretrained)

    assert jax.tree.structure(merged) == jax.tree.structure(fresh)
    got = _flat(merged)
    for key in ("['encoder']['w']", "['encoder']['b']"):
        assert got[key].dtype == np.float32
        np.testing.assert_array_equal(got[key], _flat(pretrained)[key].astype(np.float32))
    for key in ("['label_embed']['embeddings']", "['head']['w']"):
        np.testing.assert_array_equal(got[key], _flat(fresh)[key])
    assert sorted(new) == ["['head']['w']", "['label_embed']['embeddings']"]


def test_unused_pretrained_names_what_a_finetune_leaves_out():
    """A class-conditional pretraining finetuned with --noclass_conditional dropped its
    label table while the log said only "new parameters: none"."""
    from unidiff.train.checkpoint import unused_pretrained

    fresh = {"enc": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}}
    pretrained = {"enc": {"w": np.ones((2, 3)), "b": np.ones(4)}, "label_embed": {"e": np.ones((11, 3))}}
    assert unused_pretrained(fresh, pretrained) == ["['enc']['b']", "['label_embed']['e']"]
    assert unused_pretrained(fresh, {"enc": {"w": np.ones((2, 3))}}) == []
    merged, new = merge_pretrained(fresh, pretrained)
    assert new == ["['enc']['b']"]  # the other side of the same comparison


def test_finetune_starts_from_the_pretrained_params(tiny_pretrained, tiny_finetuned):
    from unidiff.train import workdir as wd

    # Step 1 ran at lr 0 (warmup from 0), so its parameters (and its EMA, decay 0.5 of two
    # equal trees) are the initial ones bit for bit.
    assert [m["lr"] for m in read_metrics(tiny_finetuned)][0] == 0.0
    pre_step = max(m["step"] for m in read_metrics(tiny_pretrained))
    pre_state = _read_state(tiny_pretrained, pre_step)
    assert not pre_state.get("ema_params")  # the pretraining kept no EMA: its raw params
    pretrained = _flat(pre_state["params"])
    ft_state = _read_state(tiny_finetuned, 1)

    trained = wd.load_workdir(str(tiny_finetuned))
    seed = json.loads((tiny_finetuned / "config.json").read_text())["seed"]
    init_key, _ = jax.random.split(jax.random.key(seed))  # as unidiff.train.loop.train
    fresh = _flat(jax.jit(trained.model.init)(init_key))

    matched = {k for k, v in fresh.items() if k in pretrained and pretrained[k].shape == v.shape}
    assert set(fresh) - matched == {k for k in fresh if "label" in k.lower()} != set()
    # The pretrained values are not those of a fresh initialisation (else this proves nothing).
    assert any(not np.array_equal(fresh[k], pretrained[k]) for k in matched)
    for field in ("params", "ema_params"):
        got = _flat(ft_state[field])
        assert set(got) == set(fresh), field
        for k in matched:
            np.testing.assert_array_equal(got[k], pretrained[k], err_msg=f"{field} {k}")
        for k in set(fresh) - matched:
            np.testing.assert_array_equal(got[k], fresh[k], err_msg=f"{field} {k}")


def _pretrain_config(tmp_path, **flags):
    workdir = tmp_path / "pre"
    workdir.mkdir()
    cfg = TrainConfig(workdir=str(workdir), train_steps=4, **flags)
    (workdir / "config.json").write_text(json.dumps(cfg.to_json()))
    return str(workdir)


@pytest.mark.parametrize("recipe,arch", [("mae", "umd_no_adaln"), ("usp", "mae"), ("mdt", "mdt")])
def test_finetune_keeps_the_architecture_auto_resolved_for_the_pretraining(tmp_path, recipe, arch):
    """``--arch=auto`` resolves by recipe: under the finetune's umd_finetune an MAE, USP
    or MDT pretraining would come back as the UMD architecture (other parameters)."""
    pre = _pretrain_config(tmp_path, recipe=recipe, model="N/2", si_position=-1 if recipe == "mdt" else None)
    fixed = inherited_flags(pre, "umd_finetune", "digits")
    assert fixed == {"model": "N/2", "arch": arch, "image_size": 16, "num_cls_tokens": -1,
                     "si_position": -1 if recipe == "mdt" else None}
    # The same recipe resolves the same way: "auto" stays as it was written.
    assert inherited_flags(pre, recipe, "digits")["arch"] == "auto"


def test_finetune_keeps_the_native_image_size_of_the_pretraining_dataset(tmp_path):
    """0 means the native size of the dataset (and directory) it is read with: pinned to
    the pretraining's, here the digits' 16, on any dataset; and a finetune that already
    has a checkpoint keeps what its own config.json says, so that it resumes as begun."""
    pre = _pretrain_config(tmp_path, dataset="digits", model="N/2")
    assert inherited_flags(pre, "umd_finetune", "digits")["image_size"] == 16
    assert inherited_flags(pre, "umd_finetune", "synthetic")["image_size"] == 16
    assert set(inherited_flags(pre, "umd_finetune", "digits")) == set(INHERITED)
    ft = tmp_path / "ft"
    ft.mkdir()
    began = TrainConfig(workdir=str(ft), recipe="umd_finetune", model="N/2", arch="auto", image_size=0,
                        train_steps=4)
    (ft / "config.json").write_text(json.dumps(began.to_json()))
    assert inherited_flags(pre, "umd_finetune", "digits", workdir=str(ft))["image_size"] == 16  # no checkpoint
    state = init_state({"w": jnp.zeros(2)}, optax.sgd(0.1), jax.random.key(0), False)
    ckpt = Checkpointer(str(ft))
    try:
        assert ckpt.save(1, state, iter(grain.MapDataset.range(4).to_iter_dataset()), force=True)
    finally:
        ckpt.close()
    own = inherited_flags(pre, "umd_finetune", "digits", workdir=str(ft))
    assert (own["arch"], own["image_size"]) == ("auto", 0)


@pytest.fixture(scope="module")
def usp_pretrained(tmp_path_factory):
    """One step of USP pretraining of the tiny P/2 model (one block) on the UMD paper's
    MAE architecture (no AdaLN, 4 CLS tokens, learned position tables): USP's own (512x8
    decoder, tested as a transfer source in tests/models) takes twice as long to compile."""
    pre = tmp_path_factory.mktemp("usp") / "pre"
    run_binary("pretrain.py", [*TINY, "--recipe=usp", "--arch=umd_no_adaln", "--train_steps=1",
                               f"--workdir={pre}"])
    return pre


def test_finetune_refuses_a_checkpoint_of_another_architecture(usp_pretrained, tmp_path):
    """If the model built from the pretraining's config.json is not the one its checkpoint
    holds (here: a checkpoint without AdaLN whose config.json was edited to say umd),
    every parameter but the label embedding would be trained from scratch without
    notice: the finetune stops before its first step instead."""
    pre = tmp_path / "pre"
    shutil.copytree(usp_pretrained, pre)
    cfg = json.loads((pre / "config.json").read_text())
    # With the "resolved" record the flags are compared with what the run recorded, up
    # front (exit 2, nothing written); a config.json of flags only is caught when the
    # checkpoint is merged (exit 1, before the first step).
    for record, code, needle in ((True, 2, "pretraining recorded (adaln False -> True)"),
                                 (False, 1, "step 1 does not fit the finetune's model")):
        edited = {**cfg, "arch": "umd"}
        if not record:
            edited.pop("resolved")
        (pre / "config.json").write_text(json.dumps(edited))
        ft = tmp_path / f"ft_{record}"
        proc = run_binary("finetune.py", ["--dataset=synthetic", "--batch_size=8", "--train_steps=2",
                                          f"--init_from={pre}", f"--workdir={ft}"], check=False)
        assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert needle in proc.stderr and "adaln" in proc.stderr.lower(), proc.stderr[-2000:]
        assert not (ft / "checkpoints").exists() or not any((ft / "checkpoints").iterdir())
        assert record is False or not ft.exists()


def test_transfer_to_dit_starts_a_dit_from_the_usp_encoder(usp_pretrained, tmp_path):
    """USP (REFERENCE §4): the DiT's first step holds the pretrained patch embedding and
    blocks (LayerNorm scales and offsets included), AdaLN modulation at zero, and nothing
    of the pretraining's decoder, mask token or CLS token."""
    from unidiff.train import workdir as wd

    ft = tmp_path / "ft"
    proc = run_binary("finetune.py", [
        "--dataset=synthetic", "--batch_size=8", "--train_steps=1", "--warmup_steps=1",
        "--ema_decay=0", "--recipe=dit", "--transfer_to_dit", f"--init_from={usp_pretrained}",
        f"--workdir={ft}"])
    assert "initialised the DiT from the encoder" in proc.stderr + proc.stdout
    saved = json.loads((ft / "config.json").read_text())
    assert (saved["arch"], saved["recipe"], saved["resolved"]["model"]["norm_affine"]) == ("dit_affine", "dit", True)
    assert [m["lr"] for m in read_metrics(ft)] == [0.0]  # step 1 kept the initial parameters

    pretrained = _flat(_read_state(usp_pretrained, 1)["params"])
    got = _flat(_read_state(ft, 1)["params"])
    copied = {k for k in got if k.startswith("['encoder']") and ("patch_embed" in k or (
        "block_0/" in k and "adaln" not in k))}
    assert len(copied) == 2 + 12  # patch embedding; qkv, proj, fc1, fc2, norm1, norm2 (w/b, scale/offset)
    for k in copied:
        np.testing.assert_array_equal(got[k], pretrained[k], err_msg=k)
    # The pretrained values are not those of the DiT's own initialisation (else this proves nothing).
    init_key, _ = jax.random.split(jax.random.key(saved["seed"]))  # as unidiff.train.loop.train
    fresh = _flat(jax.jit(wd.load_workdir(str(ft)).model.init)(init_key))
    assert any(not np.array_equal(fresh[k], pretrained[k]) for k in copied)
    adaln = [k for k in got if "adaln" in k]
    assert adaln and all(not np.any(got[k]) for k in adaln)
    assert not any(s in k for k in got for s in ("mask_token", "cls_tokens", "decoder_embed", "block_1"))
    assert not any(k.startswith("['decoder']") and "block_" in k for k in got)


def test_transfer_to_dit_needs_the_dit_recipe(usp_pretrained, tmp_path):
    proc = run_binary("finetune.py", ["--dataset=synthetic", "--batch_size=8", "--train_steps=1",
                                      "--transfer_to_dit", f"--init_from={usp_pretrained}",
                                      f"--workdir={tmp_path / 'ft'}"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "finetune.py: error: --transfer_to_dit: trains a DiT on the DiT objective, so --recipe "
        "must be dit (got umd_finetune)")
    assert not (tmp_path / "ft").exists() or not any((tmp_path / "ft").iterdir())


def test_transfer_to_dit_refuses_a_pretraining_that_cannot_fill_the_dit(tmp_path):
    """MDT's encoder holds only the blocks before its side-interpolater (2 of N's 4): USP
    copies block i into block i, so the finetune stops before reading any checkpoint."""
    pre = _pretrain_config(tmp_path, recipe="mdt", model="N/2", dataset="synthetic", image_size=8)
    # A checkpoint that holds no model at all: the refusal comes before it is read.
    state = init_state({"w": jnp.zeros(2)}, optax.sgd(0.1), jax.random.key(0), False)
    ckpt = Checkpointer(pre)
    try:
        assert ckpt.save(1, state, iter(grain.MapDataset.range(4).to_iter_dataset()), force=True)
    finally:
        ckpt.close()
    proc = run_binary("finetune.py", ["--dataset=synthetic", "--batch_size=8", "--train_steps=1",
                                      "--recipe=dit", "--transfer_to_dit", f"--init_from={pre}",
                                      f"--workdir={tmp_path / 'ft'}"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"finetune.py: error: --transfer_to_dit: the encoder of --init_from {pre} "
                           "(--arch mdt, --model N/2) cannot initialise the DiT: depth: the pretrained "
                           "encoder has 2 blocks and the DiT 4"), last
    assert not (tmp_path / "ft" / "checkpoints").exists()


def test_finetune_takes_the_recorded_native_size_when_the_data_has_moved(tmp_path):
    """image_size 0 was resolved by reading the pretraining's data again, and where that
    had moved, by the finetune's own data: a model of another size for the frozen sin-cos
    architectures (no parameter shows it). The size the run recorded comes first."""
    from unidiff.train import loop

    pre = _pretrain_config(tmp_path, recipe="usp", model="N/2", dataset="latents",
                           data_dir=str(tmp_path / "moved_away"))
    raw = json.loads((tmp_path / "pre" / "config.json").read_text())
    from unidiff import models as um
    from unidiff.corruption import recipes

    model = um.mae_config("N/2", 8, 4)
    raw["resolved"] = loop.resolved_record(model, recipes.usp())
    (tmp_path / "pre" / "config.json").write_text(json.dumps(raw))
    assert inherited_flags(pre, "umd_finetune", "latents", str(tmp_path / "elsewhere"))["image_size"] == 8


def test_finetune_on_data_with_other_channels_is_refused_up_front(tiny_pretrained, usp_pretrained, tmp_path):
    """A 3-channel pretraining finetuned on 1-channel digits was caught only when the
    checkpoint was merged (exit 1, workdir and lock created, no word of channels); as a
    USP transfer the channel check compared the finetune's channels with themselves."""
    common = ["--dataset=digits", "--batch_size=8", "--train_steps=1"]
    for pre, extra, needle in ((tiny_pretrained, [], "pretraining recorded (in_channels 3 -> 1"),
                               (usp_pretrained, ["--recipe=dit", "--transfer_to_dit"], "in_channels")):
        ft = tmp_path / f"ft_{len(extra)}"
        proc = run_binary("finetune.py", [*common, *extra, f"--init_from={pre}", f"--workdir={ft}"],
                          check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"finetune.py: error: --") and needle in last, last
        assert not ft.exists()


@pytest.mark.parametrize("bad,needle", [(dict(model=5), "'model' is 5, expected a string"),
                                        (dict(image_size="8"), "'image_size' is \"8\", expected an integer")])
def test_a_pretraining_config_json_value_of_the_wrong_type_is_named(tmp_path, bad, needle):
    """A hand-edited value of the wrong type in the pretraining's config.json ended the
    finetune in a traceback ('int' object has no attribute 'rsplit')."""
    pre = _pretrain_config(tmp_path, model="N/2")
    path = os.path.join(pre, "config.json")
    with open(path) as f:
        raw = json.load(f)
    with open(path, "w") as f:
        json.dump({**raw, **bad}, f)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {needle}")):
        inherited_flags(pre, "umd_finetune", "digits")


def test_a_bad_inherited_model_flag_names_the_pretraining(tmp_path):
    """finetune.py has no --image_size or --model flag: an error about a value copied from
    the pretraining named only a flag the user cannot set."""
    pre = _pretrain_config(tmp_path, dataset="synthetic", model="P/2", image_size=8)
    path = os.path.join(pre, "config.json")
    with open(path) as f:
        raw = json.load(f)
    with open(path, "w") as f:
        json.dump({**raw, "model": "P/3"}, f)
    proc = run_binary("finetune.py", ["--dataset=synthetic", "--batch_size=8", "--train_steps=1",
                                      f"--init_from={pre}", f"--workdir={tmp_path / 'ft'}"],
                      check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"finetune.py: error: --init_from {pre}: "), lines
    assert "model 'P/3'" in lines[0] and "not divisible by the patch size 3" in lines[0], lines
    assert not (tmp_path / "ft").exists()


# finetune.py with its agreed_preparation's exit run as in a 2-process run whose other
# process sent the same row (jax.process_count and the all-gather faked for the exit
# alone); a preparation the processes agreed on stops there, before training.
_TWO_PROCESS_EXIT = """
import runpy, sys
import jax
import numpy as np
from jax.experimental import multihost_utils
from unidiff.train import loop

real_exit = loop.agreed_preparation.__exit__

def two_process_exit(self, exc_type, exc, tb):
    count, gather = jax.process_count, multihost_utils.process_allgather
    jax.process_count = lambda: 2
    multihost_utils.process_allgather = lambda row: np.stack([row, row])
    try:
        out = real_exit(self, exc_type, exc, tb)
    finally:
        jax.process_count, multihost_utils.process_allgather = count, gather
    if exc_type is None:
        print("agreed on the flags of", self.cfg.workdir)
        sys.exit(0)
    return out

loop.agreed_preparation.__exit__ = two_process_exit
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_finetune_gives_its_agreed_preparation_the_run_config(tiny_pretrained, tmp_path):
    """Every process of a multi-process finetune hashes its flags for the others: without
    the run's TrainConfig set on the block, every multi-process finetune stopped with
    'the block did not set .cfg' (a one-process run never checks)."""
    workdir = tmp_path / "ft"
    proc = subprocess.run(
        [sys.executable, "-c", _TWO_PROCESS_EXIT, str(ROOT / "experiments" / "finetune.py"),
         "--dataset=synthetic", "--batch_size=8", "--train_steps=1",
         f"--init_from={tiny_pretrained}", f"--workdir={workdir}"],
        capture_output=True, text=True, env=child_env(), timeout=300, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert f"agreed on the flags of {workdir}" in proc.stdout, proc.stdout[-2000:]
