"""Every bad flag is rejected with a message naming it, before anything compiles."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from fractions import Fraction

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.e2e_helpers import read_metrics, run_binary
from unidiff.train import loop
from unidiff.train.checkpoint import Checkpointer
from unidiff.train.config import ConfigError, TrainConfig
from unidiff.train.state import init_state

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
    (dict(schedule="quadratic"), "--schedule: got 'quadratic', expected one of auto, cosine, linear"),
    (dict(num_devices=4), "--num_devices"),
    (dict(microbatches=0), "--microbatches: must be >= 1"),
    (dict(microbatches=3), "--microbatches 3: batch_size=8 is not divisible by 1 devices x 3"),
    # umd's 4 clean rows of 8 cannot be split over 8 chunks of one row each.
    (dict(microbatches=8), "--microbatches 8: the 4 clean (t = 0) rows"),
    (dict(batch_size=0), "--batch_size"),
    (dict(ema_decay=1.0), "--ema_decay"),
    # NaN passes a plain `x < 0` check; inf would only fail deep inside the run.
    (dict(base_lr=float("nan")), "--base_lr"),
    (dict(min_lr=float("inf")), "--min_lr"),
    (dict(weight_decay=float("nan")), "--weight_decay"),
    (dict(grad_clip=float("nan")), "--grad_clip"),
    (dict(train_steps=0, epochs=float("inf")), "--epochs"),
    (dict(model="N/0"), "--model"),
    (dict(seed=-1), "--seed: must be >= 0"),
    (dict(train_steps=-5, epochs=0.1), "--train_steps: must be >= 0"),
    (dict(warmup_steps=-2), "--warmup_steps"),
    (dict(num_cls_tokens=-2), "--num_cls_tokens"),
    (dict(min_lr=1e-3), "--min_lr: 0.001 is above the peak learning rate 4.69e-06"),
    # Architecture and recipe that cannot train together: caught here, not when tracing.
    (dict(arch="mdt"), "--arch mdt does not fit --recipe umd"),  # no x0 head for t = 0
    (dict(arch="dit", recipe="maskdit"), "--arch dit does not fit --recipe maskdit"),  # no mask token
    (dict(si_position=1), "--si_position: only applies to the mdt architecture"),
    (dict(recipe="mdt", si_position=5), "--si_position: must be an integer block index in [-4, 4]"),
    (dict(recipe="mdt", model="P/2"), "--si_position: must be an integer block index in [-1, 1] for "
                                      "'P/2' (1 blocks), got -2 (the default; set --si_position)"),
    # Digits are never mirrored, so an explicit request for flips cannot be honoured.
    (dict(dataset="digits", image_size=16, flip="true"), "--flip: true is refused for --dataset=digits"),
]


@pytest.mark.parametrize("overrides,needle", CASES)
def test_bad_config_names_the_flag(tmp_path, overrides, needle):
    cfg = TrainConfig(workdir=str(tmp_path / "w"), **{**BASE, **overrides})
    with pytest.raises(ConfigError) as e:
        loop.prepare(cfg)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg
    # finetune.py tells the model flags it copies from a pretraining by this name.
    assert e.value.flag == re.match(r"--(\w+)", msg).group(1), (e.value.flag, msg)
    assert not (tmp_path / "w").exists()


def test_config_error_flag_is_given_or_read_from_the_message():
    assert ConfigError("--seed: must be >= 0").flag == "seed"
    assert ConfigError("--model N/3 (--arch umd): too small", flag="arch").flag == "arch"
    assert ConfigError("config.json: its resolved record is damaged").flag is None
    assert isinstance(ConfigError("--seed: x"), ValueError)


def test_config_error_flag_is_only_a_flag_the_message_starts_with():
    """A message that names a flag later on (a damaged file's, quoting a library error) is
    not that flag's error: finetune.py would blame the pretraining's model flags for it."""
    msg = "/w/config.json: records a model that this version cannot rebuild (set --si_position)"
    assert ConfigError(msg).flag is None
    assert ConfigError("process 1 of 2 refused the flags; see --num_workers").flag is None


def test_good_config_prepares(tmp_path):
    run = loop.prepare(TrainConfig(workdir=str(tmp_path / "w"), **BASE))
    assert run.total_steps == 2 and run.num_devices == 1
    assert run.model_config.num_tokens == 16


def _checkpoint_at(workdir, step: int = 1) -> None:
    """A placeholder checkpoint at ``step``: what makes a workdir resumable (prepare
    only asks for the latest step; nothing here restores it)."""
    ckpt = Checkpointer(str(workdir))
    try:
        state = init_state({"w": jnp.zeros(2)}, optax.sgd(0.1), jax.random.key(0), False)
        assert ckpt.save(step, state, iter(grain.MapDataset.range(4).to_iter_dataset()), force=True)
    finally:
        ckpt.close()


def test_changing_model_under_existing_workdir_is_rejected(tmp_path):
    cfg = TrainConfig(workdir=str(tmp_path), **BASE)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_json()))
    _checkpoint_at(tmp_path)
    loop.prepare(cfg)  # same flags: fine
    with pytest.raises(ConfigError, match="--model: 'N/4' differs from 'N/2'"):
        loop.prepare(TrainConfig(workdir=str(tmp_path), **{**BASE, "model": "N/4"}))


@pytest.mark.parametrize("si_position,encoder_depth", [(None, 2), (1, 1), (-1, 3), (0, 0)])
def test_si_position_places_mdts_side_interpolater(tmp_path, si_position, encoder_depth):
    """N has 4 blocks: the encoder holds those before --si_position, the decoder the rest."""
    run = loop.prepare(TrainConfig(workdir=str(tmp_path / "w"),
                                   **{**BASE, "recipe": "mdt", "si_position": si_position}))
    assert (run.model_config.depth, run.model_config.decoder_depth) == (encoder_depth, 4 - encoder_depth)
    assert run.model_config.side_interpolater


@pytest.mark.parametrize("arch,affine", [("dit", False), ("dit_affine", True)])
def test_dit_architectures_differ_only_in_affine_layer_norms(tmp_path, arch, affine):
    """dit_affine is exact DiT with LayerNorm scales and offsets (USP's transfer target)."""
    run = loop.prepare(TrainConfig(workdir=str(tmp_path / "w"), **{**BASE, "recipe": "dit", "arch": arch}))
    assert run.model_config.norm_affine is affine
    assert run.model_config.replace(norm_affine=False) == \
        loop.prepare(TrainConfig(workdir=str(tmp_path / "d"), **{**BASE, "recipe": "dit", "arch": "dit"})).model_config


def test_changing_si_position_under_existing_workdir_is_rejected(tmp_path):
    cfg = TrainConfig(workdir=str(tmp_path), **{**BASE, "recipe": "mdt"})
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_json()))
    _checkpoint_at(tmp_path)
    with pytest.raises(ConfigError, match="--si_position: 1 differs from None"):
        loop.prepare(TrainConfig(workdir=str(tmp_path), **{**BASE, "recipe": "mdt", "si_position": 1}))


def _began(tmp_path, recorded: bool, **flags) -> TrainConfig:
    """A resumable workdir whose config.json is ``flags``'s, with or without the resolved
    record that runs write now (config.json files written before it have none)."""
    cfg = TrainConfig(workdir=str(tmp_path), **{**BASE, **flags})
    record = cfg.to_json()
    if recorded:
        record["resolved"] = loop.resolved_record(*loop.resolve(cfg, _info(cfg)))
    (tmp_path / "config.json").write_text(json.dumps(record))
    _checkpoint_at(tmp_path)
    return cfg


def _info(cfg):
    from unidiff import data as ud

    return ud.validate_data(cfg.dataset, cfg.data_dir, "train")


@pytest.mark.parametrize("recorded", [True, False])
@pytest.mark.parametrize("began,now", [
    (dict(recipe="mdt"), dict(recipe="mdt", si_position=-2)),  # MDT's default, spelled out
    (dict(recipe="mdt", si_position=-2), dict(recipe="mdt", arch="mdt")),
    (dict(), dict(arch="umd", num_cls_tokens=4, r_t0=0.5, m_t0=0.75, m_t=0.375)),
    (dict(m_t=0.375), dict()),
    (dict(), dict(schedule="cosine")),  # pixels: auto is the recipe's cosine
])
def test_resume_compares_what_the_flags_build_not_their_spelling(tmp_path, recorded, began, now):
    """Before, an MDT run started without --si_position could not be resumed with
    --si_position=-2, the same model."""
    _began(tmp_path, recorded, **began)
    run = loop.prepare(TrainConfig(workdir=str(tmp_path), **{**BASE, **now}))
    old = json.loads((tmp_path / "config.json").read_text())
    # Nothing to record: the model and the masking are the ones the run began with.
    assert loop._changed_flags(run.cfg, old, loop.resolved_record(run.model_config, run.recipe)) == {}


@pytest.mark.parametrize("recorded", [True, False])
@pytest.mark.parametrize("then,now", [(0, 2), (2, 0), (2, 3)])
def test_resume_refuses_another_worker_count_up_front(tmp_path, recorded, then, now):
    """Grain's saved loader position has a layout per worker count: a resume on another
    --num_workers used to start, then fail at the restore ("KeyError: 'exhausted'")
    calling the only checkpoint damaged."""
    _began(tmp_path, recorded, num_workers=then)
    with pytest.raises(ConfigError, match=rf"--num_workers {now}: .* --num_workers {then} .*resume "
                                          rf"with --num_workers={then}$"):
        loop.prepare(TrainConfig(workdir=str(tmp_path), **{**BASE, "num_workers": now}))
    assert loop.prepare(TrainConfig(workdir=str(tmp_path), **{**BASE, "num_workers": then})).cfg.num_workers == then


@pytest.mark.parametrize("recorded", [True, False])
def test_resume_still_refuses_a_flag_that_builds_another_model(tmp_path, recorded):
    _began(tmp_path, recorded, recipe="mdt")
    with pytest.raises(ConfigError, match="--si_position: -1 differs from None"):
        loop.prepare(TrainConfig(workdir=str(tmp_path), **{**BASE, "recipe": "mdt", "si_position": -1}))
    with pytest.raises(ConfigError, match="--m_t: 0.5 differs from None"):
        loop.prepare(TrainConfig(workdir=str(tmp_path), **{**BASE, "recipe": "mdt", "m_t": 0.5}))
    with pytest.raises(ConfigError, match="--schedule: 'cosine' differs from 'auto'"):
        loop.prepare(TrainConfig(workdir=str(tmp_path), **{**BASE, "recipe": "mdt", "schedule": "cosine"}))


@pytest.mark.parametrize("recipe,pixels", [("umd", "cosine"), ("umd_finetune", "cosine"), ("dit", "cosine"),
                                           ("maskdit", "cosine"), ("mae", "cosine"), ("mdt", "linear"),
                                           ("usp", "linear")])
def test_latents_train_on_the_linear_schedule(recipe, pixels):
    """REFERENCE §1: pixels use cosine, latents linear (UMD Table 4; DiT, MDT and USP train
    SD-VAE latents on DDPM's linear betas). --schedule overrides either way."""
    def schedule(**flags):
        return loop.recipe_for(TrainConfig(workdir="-", recipe=recipe, train_steps=1, **flags)).schedule

    assert schedule(dataset="synthetic") == pixels
    assert schedule(dataset="latents") == "linear"
    assert schedule(dataset="latents", schedule="cosine") == "cosine"
    assert schedule(dataset="synthetic", schedule="linear") == "linear"


@pytest.mark.parametrize("part,field,then", [("recipe", "m_t", 0.5), ("recipe", "schedule", "linear"),
                                             ("model", "norm_eps", 1e-5), ("model", "depth", 3)])
def test_resume_refuses_flags_this_version_resolves_differently(tmp_path, part, field, then):
    """The same flags, but config.json records that they built something else when the
    run began (an older version's default): resuming would change the model or the
    objective mid-run without any flag having changed."""
    cfg = _began(tmp_path, True)
    record = json.loads((tmp_path / "config.json").read_text())
    now = record["resolved"][part][field]
    record["resolved"][part][field] = then
    (tmp_path / "config.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=rf"now build another {part} than the one its config.json "
                                          rf"records \({field} {then!r} -> {now!r}\)"):
        loop.prepare(cfg)


def test_a_changed_label_dropout_default_is_a_changed_flag(tmp_path):
    """--label_dropout unset on both sides, but the recipe's default changed since the
    run began (dit, maskdit and mdt went from 0 to 0.1): the resumed steps train with
    another dropout, which must show in the changed-flags record."""
    cfg = _began(tmp_path, True, recipe="dit", class_conditional=True)
    old = json.loads((tmp_path / "config.json").read_text())
    old["resolved"]["recipe"]["label_dropout"] = 0.0
    run = loop.prepare(cfg)
    now = loop.resolved_record(run.model_config, run.recipe)
    assert now["recipe"]["label_dropout"] == 0.1
    assert loop._changed_flags(cfg, old, now) == {"label_dropout": (0.0, 0.1)}
    # Given as a flag, the change is reported as resolved values, not as None -> 0.2.
    flagged = TrainConfig(**{**cfg.to_json(), "label_dropout": 0.2})
    assert loop._changed_flags(flagged, old, loop.resolved_record(run.model_config, loop.recipe_for(flagged))) \
        == {"label_dropout": (0.0, 0.2)}


@pytest.mark.parametrize("flag,old,new", [("ema_decay", 0.0, 0.999), ("ema_decay", 0.999, 0.0),
                                          ("grad_clip", 1.0, 0.0), ("grad_clip", 0.0, 1.0)])
def test_switching_ema_or_clipping_under_existing_workdir_is_rejected(tmp_path, flag, old, new):
    """EMA and clipping on or off decide the checkpoint's structure; their values may change."""
    cfg = TrainConfig(workdir=str(tmp_path), **{**BASE, flag: old})
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_json()))
    _checkpoint_at(tmp_path)
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(ConfigError, match=f"--{flag}: {new!r} turns .* {old!r}"):
        loop.prepare(TrainConfig(workdir=str(tmp_path), **{**BASE, flag: new}))
    assert (tmp_path / "config.json").read_text() == before
    if old > 0:  # another nonzero value keeps the same structure
        loop.prepare(TrainConfig(workdir=str(tmp_path), **{**BASE, flag: old / 2}))


def test_workdir_without_a_checkpoint_starts_afresh_with_new_flags(tmp_path):
    """A config.json left by a run that stopped before its first checkpoint (a crash, a
    kill) has nothing to resume, so it does not lock the workdir to its flags."""
    stale = TrainConfig(workdir=str(tmp_path), **{**BASE, "model": "N/4", "seed": 7})
    (tmp_path / "config.json").write_text(json.dumps(stale.to_json()))
    run = loop.prepare(TrainConfig(workdir=str(tmp_path), **BASE))
    assert run.model_config.patch_size == 2


def test_train_steps_below_the_checkpoint_step_is_rejected(tmp_path):
    cfg = TrainConfig(workdir=str(tmp_path), **{**BASE, "train_steps": 10})
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_json()))
    _checkpoint_at(tmp_path, step=5)
    before = (tmp_path / "config.json").read_text()
    loop.prepare(TrainConfig(workdir=str(tmp_path), **{**BASE, "train_steps": 5}))  # done: fine
    with pytest.raises(ConfigError, match="--train_steps: the run in .* is already at step 5, past the 4 steps"):
        loop.prepare(TrainConfig(workdir=str(tmp_path), **{**BASE, "train_steps": 4}))
    assert (tmp_path / "config.json").read_text() == before


def test_a_workdir_in_use_by_another_run_is_refused(tmp_path):
    """Two runs in one workdir would interleave checkpoints and metrics."""
    run = loop.prepare(TrainConfig(workdir=str(tmp_path / "w"), **BASE))
    (tmp_path / "w").mkdir()
    held = loop.lock_workdir(str(tmp_path / "w"))  # a second open file: flock conflicts
    try:
        with pytest.raises(loop.TrainingError, match=r"another run \(pid \d+\) is using it"):
            loop.train(run)
        assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [".lock"]  # nothing written
    finally:
        held.close()
    loop.lock_workdir(str(tmp_path / "w")).close()  # released: free again


def test_folder_dataset_needs_an_image_size(tmp_path):
    """Folder images have no common size: without --image_size the run cannot start."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (10 + i, 12, 3), np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    base = {**BASE, "dataset": "folder", "data_dir": str(tmp_path / "data")}
    with pytest.raises(ConfigError, match="--image_size: required for --dataset folder"):
        loop.prepare(TrainConfig(workdir=str(tmp_path / "w"), **{**base, "image_size": 0}))
    assert not (tmp_path / "w").exists()
    assert loop.prepare(TrainConfig(workdir=str(tmp_path / "w"), **base)).image_size == 8


@pytest.mark.parametrize("content", ['{"recipe": "umd",\n', "[1, 2]"])
def test_unreadable_config_json_is_named(tmp_path, content):
    (tmp_path / "config.json").write_text(content)
    _checkpoint_at(tmp_path)
    with pytest.raises(ConfigError, match="--workdir: .*config.json"):
        loop.prepare(TrainConfig(workdir=str(tmp_path), **BASE))


def test_fresh_start_drops_records_of_a_run_killed_before_its_first_checkpoint(tmp_path, tiny_args):
    """A run killed before any checkpoint left metrics.jsonl records; starting again must
    not append to them (they would repeat steps 1, 2, ... in the file)."""
    stale = [{"step": s, "loss": 9.0} for s in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    run_binary("pretrain.py", tiny_args + ["--train_steps=3", f"--workdir={tmp_path}"])
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss"] != 9.0 for r in records)


def test_init_from_without_a_complete_checkpoint_is_rejected(tmp_path):
    """What a pretraining run killed before its first checkpoint leaves behind."""
    pre = tmp_path / "pre"
    (pre / "checkpoints").mkdir(parents=True)
    (pre / "config.json").write_text(json.dumps(TrainConfig(workdir=str(pre), **BASE).to_json()))
    with pytest.raises(ConfigError, match="--init_from .*no complete checkpoint"):
        loop.prepare(TrainConfig(workdir=str(tmp_path / "ft"), init_from=str(pre), **BASE))
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("kind", ["file", "file_parent"])
def test_workdir_that_cannot_be_a_folder_is_rejected(tmp_path, kind):
    afile = tmp_path / "afile"
    afile.write_text("x")
    workdir = afile if kind == "file" else afile / "w"
    with pytest.raises(ConfigError, match="--workdir .*(is a file|not a folder)"):
        loop.prepare(TrainConfig(workdir=str(workdir), **BASE))
    assert afile.read_text() == "x"


def test_cli_exits_2_with_one_error_line(tmp_path, tiny_args):
    proc = run_binary("pretrain.py", tiny_args + ["--train_steps=2", f"--workdir={tmp_path}",
                                                  "--m_t=1.0"], check=False)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert lines == ["pretrain.py: error: --m_t: mask ratio must be in [0, 1), got 1.0"], proc.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("dataset,flip,want", [
    ("digits", "auto", False), ("digits", "false", False),
    ("synthetic", "auto", True), ("synthetic", "true", True), ("synthetic", "false", False),
])
def test_flip_resolution(tmp_path, dataset, flip, want):
    size = 16 if dataset == "digits" else 8
    run = loop.prepare(TrainConfig(workdir=str(tmp_path / "w"),
                                   **{**BASE, "dataset": dataset, "image_size": size, "flip": flip}))
    assert run.flip is want


def test_cli_flip_true_on_digits_exits_2_before_any_work(tmp_path):
    """It used to train without flips while config.json recorded "flip": "true"."""
    workdir = tmp_path / "w"
    proc = run_binary("pretrain.py", ["--dataset=digits", "--model=N/2", "--batch_size=8",
                                      "--train_steps=3", "--flip=true", f"--workdir={workdir}"],
                      check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and lines[0].startswith("pretrain.py: error: --flip: "), proc.stderr
    assert "--flip=auto or --flip=false" in lines[0]
    assert not workdir.exists()


def test_cli_batch_not_divisible_by_devices(tmp_path, tiny_args):
    proc = run_binary(
        "pretrain.py", tiny_args + ["--batch_size=12", "--train_steps=2", f"--workdir={tmp_path}"],
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, check=False,
    )
    assert proc.returncode == 2
    assert "--batch_size 12 is not divisible by the 8 devices" in proc.stderr


MALFORMED_RECORDS = [
    [],  # not an object
    {},  # neither part
    {"model": None, "recipe": None},  # was a TypeError traceback
    {"model": "N/2", "recipe": "umd"},
    {"model": {"image_size": 8}, "recipe": {}},  # only keys both sides have were compared
]


@pytest.mark.parametrize("resolved", MALFORMED_RECORDS)
def test_a_malformed_resolved_record_is_refused_naming_config_json(tmp_path, resolved):
    """A "resolved" record without the model and the masking (hand-edited, or torn) was
    taken as one that matches anything: another --model and --m_t resumed the run, or
    the resume ended in a TypeError. It is refused, naming config.json, whatever the flags."""
    cfg = _began(tmp_path, True)
    record = json.loads((tmp_path / "config.json").read_text())
    record["resolved"] = resolved
    (tmp_path / "config.json").write_text(json.dumps(record))
    for flags in (cfg, TrainConfig(workdir=str(tmp_path), **{**BASE, "model": "N/4", "m_t": 0.5})):
        with pytest.raises(ConfigError) as e:
            loop.prepare(flags)
        msg = str(e.value)
        assert msg.startswith(f'{tmp_path / "config.json"}: its "resolved" record ') and "\n" not in msg, msg


def _latents(root, size: int, channels: int, classes: int) -> str:
    root.mkdir(parents=True)
    np.save(root / "latents.npy", np.zeros((8, size, size, channels), np.float32))
    np.save(root / "labels.npy", np.arange(8, dtype=np.int32) % classes)
    return str(root)


@pytest.mark.parametrize("other,field", [((16, 4, 2), "image_size 8 -> 16"),
                                         ((8, 3, 2), "in_channels 4 -> 3"),
                                         ((8, 4, 3), "num_classes 2 -> 3")])
def test_other_data_under_the_same_flags_is_named_as_the_data(tmp_path, other, field):
    """The same flags with a --data_dir whose latents have another native size (under
    --image_size=0), channel count or class count build another model. That was refused
    as 'this version of unidiff resolves them differently. Resume with the version that
    began the run', a remedy that cannot work: the version is the same, the data is not."""
    began = _latents(tmp_path / "a", 8, 4, 2)
    (tmp_path / "w").mkdir()
    cfg = _began(tmp_path / "w", True, dataset="latents", data_dir=began, image_size=0,
                 class_conditional=True)
    loop.prepare(cfg)  # the run's own data: fine
    moved = _latents(tmp_path / "b", *other)
    with pytest.raises(ConfigError) as e:
        loop.prepare(TrainConfig(**{**cfg.to_json(), "data_dir": moved}))
    msg = str(e.value)
    assert msg.startswith(f"--data_dir {moved}: its latents data builds another model than the one "), msg
    assert f"({field}): the run trained on other data (--data_dir {began})" in msg, msg
    assert "version" not in msg


@pytest.mark.parametrize("bad,needle", [(dict(model=5), "'model' is 5, expected a string"),
                                        (dict(model=None), "'model' is null, expected a string"),
                                        (dict(arch=None), "'arch' is null, expected a string"),
                                        (dict(image_size="8"), "'image_size' is \"8\", expected an integer"),
                                        (dict(seed=True), "'seed' is true, expected an integer"),
                                        (dict(r_t0="0.5"), "'r_t0' is \"0.5\", expected a number or null")])
def test_a_config_json_value_of_the_wrong_type_is_named(tmp_path, bad, needle):
    """A hand-edited config.json value of the wrong type ended in an AttributeError,
    KeyError or TypeError traceback from whichever builder first used it."""
    cfg = _began(tmp_path, False)
    (tmp_path / "config.json").write_text(json.dumps({**cfg.to_json(), **bad}))
    with pytest.raises(ConfigError, match=re.escape(needle)):
        loop.prepare(cfg)


@pytest.mark.parametrize("bad,needle", [(dict(model="Z/9"), "--model: 'N/2' differs from 'Z/9'"),
                                        (dict(arch="nope"), "--arch: 'auto' differs from 'nope'")])
def test_an_old_config_json_whose_flags_cannot_be_built_names_the_flag(tmp_path, bad, needle):
    """A config.json without a resolved record has its flags resolved by this code; one
    whose values cannot be (hand-edited) ended in a traceback instead of the flag
    comparison that names them."""
    cfg = _began(tmp_path, False)
    (tmp_path / "config.json").write_text(json.dumps({**cfg.to_json(), **bad}))
    with pytest.raises(ConfigError, match=needle):
        loop.prepare(cfg)


def test_microbatches_reach_the_train_step(tmp_path, step_configs):
    """--microbatches gives the same update as the whole batch, so no loss could show
    that the loop dropped it; the StepConfig the loop builds must carry it."""
    seen = step_configs(loop)
    run = loop.prepare(TrainConfig(workdir=str(tmp_path / "w"), microbatches=4,
                                   **{**BASE, "model": "P/2", "train_steps": 1}))
    loop.train(run)
    assert [c.microbatches for c in seen] == [4]


@settings(max_examples=60, deadline=None)
@given(devices=st.sampled_from([1, 2, 4, 8]), per_device=st.integers(1, 64),
       r_t0=st.sampled_from([0.0, 0.05, 0.1, 0.25, 0.5, 0.9, 1.0]))
def test_clean_rows_rounded_to_the_devices_are_reported(devices, per_device, r_t0):
    """Every device takes the same split, so the clean rows are int(B * r_t0) rounded
    down to a multiple of the devices; the run warns when that loses rows."""
    batch = devices * per_device
    whole = int(Fraction(str(r_t0)) * batch)
    kept = whole // devices * devices
    note = loop.clean_rows_warning(batch, r_t0, devices)
    assert (note is None) == (kept == whole)
    if note:
        assert f"is {whole} clean rows" in note and f"so {kept} per step" in note
        assert ("no rows at all" in note) == (kept == 0)


@pytest.mark.parametrize("size", [4, 16])
def test_latents_at_another_image_size_are_refused_up_front(tmp_path, size):
    """Latents are not resized; --image_size other than theirs passed validation and the
    run died in the loader with a traceback (exit 1, after taking the workdir lock)."""
    data = _latents(tmp_path / "l", 8, 4, 2)
    with pytest.raises(ConfigError, match=rf"--image_size {size}: the latents are 8x8 .* --image_size=8 or"):
        loop.prepare(TrainConfig(workdir=str(tmp_path / "w"), **{**BASE, "dataset": "latents",
                                                                 "data_dir": data, "image_size": size}))
    run = loop.prepare(TrainConfig(workdir=str(tmp_path / "w"), **{**BASE, "dataset": "latents",
                                                                   "data_dir": data, "image_size": 8}))
    assert run.image_size == 8


def test_resume_refuses_a_data_dir_with_another_number_of_examples(tmp_path):
    """The saved stream position indexes a permutation of the run's N examples: with
    images added or removed a resume silently repeated or skipped examples and, under
    --epochs, stretched the LR schedule mid-run."""
    cfg = _began(tmp_path, True)
    n = _info(cfg).num_examples
    record = json.loads((tmp_path / "config.json").read_text())
    for then in (n + 8, n - 1):
        record["resolved"]["num_examples"] = then
        (tmp_path / "config.json").write_text(json.dumps(record))
        with pytest.raises(ConfigError, match=rf"--data_dir None: its synthetic training split has "
                                              rf"{n} examples, but the run .* trained on {then} "):
            loop.prepare(cfg)
    record["resolved"]["num_examples"] = n
    (tmp_path / "config.json").write_text(json.dumps(record))
    assert loop.prepare(cfg).data_info.num_examples == n


def test_a_finetune_resumes_without_its_moved_init_from(tmp_path):
    """A resume never reads --init_from, but its checks ran anyway, so a finetune could not
    continue once its pretraining workdir was moved."""
    ft = tmp_path / "ft"
    ft.mkdir()
    cfg = _began(ft, True, init_from=str(tmp_path / "moved_away"))
    assert loop.prepare(cfg).cfg.init_from == str(tmp_path / "moved_away")
    with pytest.raises(ConfigError, match="--init_from .*no checkpoints/ directory"):
        loop.prepare(dataclasses.replace(cfg, workdir=str(tmp_path / "fresh")))  # a fresh start reads it


@pytest.mark.parametrize("case", ["foreign_config", "bare_metrics", "checkpoints_file", "no_config"])
def test_workdir_holding_something_else_is_refused_and_kept(tmp_path, case):
    """A fresh start replaces config.json and metrics.jsonl: in a directory of another
    tool's files they were overwritten without a word; checkpoints without config.json
    resumed under any flags; a checkpoints file made the first save hang for minutes."""
    w = tmp_path / "w"
    w.mkdir()
    files = {"foreign_config": {"config.json": '{"model_type": "bert", "hidden_size": 768}'},
             "bare_metrics": {"metrics.jsonl": "epoch,acc\n1,0.5\n"},
             "checkpoints_file": {"checkpoints": "data"}}.get(case, {})
    for name, text in files.items():
        (w / name).write_text(text)
    if case == "no_config":
        _checkpoint_at(w)
    expect = {"foreign_config": "config.json is not a unidiff run's config.json",
              "bare_metrics": "metrics.jsonl is not a unidiff run's",
              "checkpoints_file": "checkpoints is not a directory",
              "no_config": "it has checkpoints but no config.json"}[case]
    with pytest.raises(ConfigError, match=expect) as e:
        loop.prepare(TrainConfig(workdir=str(w), **BASE))
    assert str(e.value).startswith(f"--workdir {w}: ") and "\n" not in str(e.value)
    for name, text in files.items():
        assert (w / name).read_text() == text


def test_storage_failure_is_one_line_naming_the_last_checkpoint(tmp_path, monkeypatch):
    """Disk full mid-run: orbax raised pages of nested futures at the save after the one
    that failed, and a resume on a full disk died at the config.json write in a traceback."""
    import errno

    (tmp_path / "w").mkdir()
    cfg = _began(tmp_path / "w", True)
    run = loop.prepare(cfg)
    tensorstore = ('RESOURCE_EXHAUSTED: Error writing "x/0" in OCDBT database at local file '
                   f'"{tmp_path}/w/checkpoints/6.orbax-checkpoint-tmp/state/": Failed to write '
                   "346463 bytes to file 6: No space left on device [os_error_code='28']")
    failures = [OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "w" / "config.json")),
                ValueError(tensorstore)]
    wanted = ["No space left on device: " + str(tmp_path / "w" / "config.json"),
              "No space left on device, saving checkpoint step 6"]
    for failure, what in zip(failures, wanted):
        def fail(run, init_params, failure=failure):
            raise failure
        monkeypatch.setattr(loop, "_train", fail)
        with pytest.raises(loop.TrainingError) as e:
            loop.train(run)
        assert str(e.value) == (f"--workdir {cfg.workdir}: writing the run failed ({what}); the last "
                                "complete checkpoint is step 1; fix the storage and rerun the same "
                                "command to resume from it")
    def bug(run, init_params):
        raise ValueError("a bug, not storage")
    monkeypatch.setattr(loop, "_train", bug)
    with pytest.raises(ValueError, match="a bug"):  # other errors keep their traceback
        loop.train(run)


def test_data_order_is_kept_by_a_resume_and_hashed_on_a_fresh_start(tmp_path):
    """Runs begun before the hashed shuffle seed resume with the old one: their saved
    position indexes its permutation."""
    (tmp_path / "w").mkdir()
    assert loop.prepare(TrainConfig(workdir=str(tmp_path / "fresh"), **BASE)).data_order == "hashed_seed"
    cfg = _began(tmp_path / "w", True)  # a record without "data_order": an older run
    assert loop.prepare(cfg).data_order == "seed_plus_epoch"
    record = json.loads((tmp_path / "w" / "config.json").read_text())
    for order in ud_orders():
        record["resolved"]["data_order"] = order
        (tmp_path / "w" / "config.json").write_text(json.dumps(record))
        assert loop.prepare(cfg).data_order == order
    record["resolved"]["data_order"] = "zigzag"
    (tmp_path / "w" / "config.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="data order 'zigzag'"):
        loop.prepare(cfg)


def ud_orders():
    from unidiff import data as ud

    return ud.DATA_ORDERS


def test_keep_checkpoints_and_stop_after_on_a_resume(tmp_path):
    """--keep_checkpoints N keeps the newest N steps; --stop_after S on a resume runs S
    more steps from the checkpoint (not up to step S)."""
    workdir = tmp_path / "w"
    common = {**BASE, "model": "P/2", "log_every": 1, "ckpt_every": 1, "keep_checkpoints": 2}
    loop.train(loop.prepare(TrainConfig(workdir=str(workdir), **{**common, "train_steps": 5})))
    steps = lambda: sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())  # noqa: E731
    assert steps() == [4, 5]
    loop.train(loop.prepare(TrainConfig(workdir=str(workdir),
                                        **{**common, "train_steps": 12, "stop_after": 3})))
    assert steps() == [7, 8]
    logged = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 9))


@pytest.mark.parametrize("flip", ["false", "true"])
def test_train_hands_the_data_flags_to_the_loader(tmp_path, monkeypatch, flip):
    """Nothing else checks that training reads its batches as the flags say: crop area
    swapped or dropped, flips ignored, another seed would all train without a word."""
    cfg = TrainConfig(workdir=str(tmp_path / "w"), **{**BASE, "crop_area_min": 0.3, "crop_area_max": 0.6,
                                                      "seed": 7, "flip": flip, "num_workers": 0})
    run = loop.prepare(cfg)
    seen = {}

    class Built(Exception):
        pass

    def make_loader(source, **kwargs):
        seen.update(kwargs, source=source)
        raise Built

    monkeypatch.setattr(loop.ud, "make_loader", make_loader)
    with pytest.raises(Built):
        loop.train(run)
    assert seen["source"] is run.source
    assert seen["crop_area"] == (0.3, 0.6) and seen["flip"] is (flip == "true")
    assert (seen["seed"], seen["batch_size"], seen["image_size"], seen["train"]) == (7, 8, 8, True)
    assert (seen["shard_index"], seen["shard_count"], seen["order"]) == (0, 1, run.data_order)
