"""The training loop behind ``experiments/pretrain.py`` and ``experiments/finetune.py``.

``prepare(cfg)`` validates every flag against the data, the model and the devices and
returns a ``Run`` before anything is compiled; ``train(run)`` then initialises or
resumes, steps, logs and checkpoints. A workdir holds ``config.json``,
``metrics.jsonl`` (one JSON object per logged step) and ``checkpoints/``.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import signal
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from unidiff import corruption as uc
from unidiff import data as ud
from unidiff import models as um
from unidiff.outputs import atomic_write, check_output_dir
from unidiff.train import checkpoint as ckpt_lib
from unidiff.train.config import ConfigError, TrainConfig, read_config_json
from unidiff.train.optim import OptimConfig, lr_schedule, make_optimizer
from unidiff.train.state import TrainState, init_state
from unidiff.train.step import (
    StepConfig, check_microbatches, check_model_fits_recipe, make_mesh, make_train_step, replicate,
    replicated, shard_batch,
)

log = logging.getLogger("unidiff")

def _umd_no_adaln(variant, image_size, channels, num_classes=0, **overrides):
    # The UMD paper's MAE baseline: UMD's encoder-decoder, conditioning as a token.
    return um.umd_config(variant, image_size, channels, num_classes, adaln=False, **overrides)


ARCH_BUILDERS = {
    "umd": um.umd_config,
    "umd_no_adaln": _umd_no_adaln,
    "mae": um.mae_config,
    "mdt": um.mdt_config,
    "maskdit": um.maskdit_config,
}


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses); the message says why."""


@dataclasses.dataclass
class Run:
    cfg: TrainConfig
    recipe: uc.Recipe
    model_config: Any
    source: Any
    image_size: int
    num_classes: int  # classes the model is conditioned on (0 = unconditional)
    num_devices: int
    total_steps: int
    warmup_steps: int
    flip: bool
    data_info: Any  # unidiff.data.validate_data's answer for the training split
    data_order: str = "hashed_seed"  # the loader's shuffle seeding (unidiff.data.DATA_ORDERS)


def clean_rows_warning(batch_size: int, r_t0: float, num_devices: int) -> str | None:
    """Why the clean (t = 0) rows of a step are fewer than int(batch_size * r_t0), or None.

    Every device takes the same split (REFERENCE §1), so ``uc.split_batch`` rounds the
    clean rows down to a multiple of the device count: 12 of 256 rows (r_t0 0.05) become
    8 on 8 devices, and 3 of 64 become none on 4, which drops the clean branch entirely."""
    whole, _ = uc.split_batch(batch_size, r_t0, 1)
    n_clean, _ = uc.split_batch(batch_size, r_t0, num_devices)
    if n_clean == whole:
        return None
    effect = ("the clean branch (t = 0) gets no rows at all" if n_clean == 0 else
              f"an effective r_t0 of {n_clean / batch_size:.4g}")
    return (f"r_t0 {r_t0} of batch {batch_size} is {whole} clean rows, but each of the "
            f"{num_devices} devices takes the same number, so {n_clean} per step: {effect}")


def _resolved_field(old: dict[str, Any], key: str) -> Any:
    """``key`` of the ``"resolved"`` record of the config.json ``old``; None if absent."""
    record = old.get("resolved")
    return record.get(key) if isinstance(record, dict) else None


def _device_change_warning(old: dict[str, Any], batch_size: int, r_t0: float,
                           num_devices: int) -> str | None:
    """Why a resume on ``num_devices`` trains with other clean rows per step than the
    steps recorded in ``old`` (a config.json) did on theirs, or None (same rows, or a
    record without a device count)."""
    then = _resolved_field(old, "num_devices")
    if isinstance(then, bool) or not isinstance(then, int) or then < 1 or then == num_devices:
        return None
    try:
        was = uc.split_batch(batch_size, r_t0, then)[0]
    except ValueError:  # a batch the old device count does not divide: not comparable
        return None
    now = uc.split_batch(batch_size, r_t0, num_devices)[0]
    if was == now:
        return None
    devices = lambda n: f"{n} device{'s' if n != 1 else ''}"  # noqa: E731
    return (f"the steps so far ran on {devices(then)} with {was} clean (t = 0) rows per step; "
            f"on {devices(num_devices)} the same batch {batch_size} and r_t0 {r_t0} give {now}")


def recipe_for(cfg: TrainConfig) -> uc.Recipe:
    """The recipe named by ``--recipe`` with the flags' overrides; ConfigError if invalid."""
    overrides = {k: getattr(cfg, k) for k in ("r_t0", "m_t0", "m_t", "label_dropout")
                 if getattr(cfg, k) is not None}
    # Pixels use cosine, latents linear (REFERENCE §1, UMD Table 4); MDT's and USP's own
    # recipes are linear already.
    if cfg.schedule != "auto":
        overrides["schedule"] = cfg.schedule
    elif cfg.dataset == "latents":
        overrides["schedule"] = "linear"
    try:
        return uc.recipes.get(cfg.recipe).replace(**overrides)
    except ValueError as e:
        raise ConfigError(f"--recipe {cfg.recipe} with overrides {overrides}: {e}") from None


def model_config_for(cfg: TrainConfig, image_size: int, channels: int, num_classes: int):
    arch = cfg.resolved_arch()
    variant = cfg.model
    patch = variant.rsplit("/", 1)[-1]
    if not patch.isdigit() or int(patch) < 1:
        raise ConfigError(f"--model: expected a variant like 'B/4' (size/positive patch size), got {variant!r}",
                          flag="model")
    if image_size % int(patch):
        raise ConfigError(
            f"--image_size {image_size} is not divisible by the patch size {patch} of --model {variant}",
            flag="image_size")
    overrides = {}
    if cfg.num_cls_tokens >= 0:
        overrides["num_cls_tokens"] = cfg.num_cls_tokens
    if cfg.si_position is not None:  # validate() allows it only for mdt
        overrides["si_position"] = cfg.si_position
    try:
        if arch in ("dit", "dit_affine"):
            # DiT's blocks and embeddings with UMD's x0 + eps heads, which the losses need;
            # dit_affine keeps LayerNorm scales and offsets, to take a USP encoder's.
            return um.dit_config(variant, image_size, channels, num_classes=num_classes,
                                 output="x0_eps", norm_affine=arch == "dit_affine")
        return ARCH_BUILDERS[arch](variant, image_size, channels, num_classes=num_classes,
                                   **overrides)
    except ValueError as e:
        if str(e).startswith("si_position:"):
            given = "" if cfg.si_position is not None else " (the default; set --si_position)"
            raise ConfigError(f"--{e}{given} at --model {variant}", flag="si_position") from None
        raise ConfigError(f"--model {variant} (--arch {arch}): {e}", flag="model") from None


# Flags whose only effect is the model, or the recipe's masking, that they build. A resume
# compares what they build, not how they are spelled: --si_position=-2 resumes a run that
# left MDT's default, --arch=umd one that said auto.
MODEL_FLAGS = ("arch", "model", "image_size", "num_cls_tokens", "si_position")
RECIPE_FLAGS = ("r_t0", "m_t0", "m_t", "schedule")


def resolve(cfg: TrainConfig, info: Any) -> tuple[Any, uc.Recipe]:
    """The model config and recipe that ``cfg`` builds for a dataset described by
    ``info`` (``unidiff.data.validate_data``'s answer); ConfigError if they are invalid."""
    image_size = cfg.image_size or info.image_size
    if cfg.dataset == "latents" and cfg.image_size and cfg.image_size != info.image_size:
        raise ConfigError(f"--image_size {cfg.image_size}: the latents are {info.image_size}x"
                          f"{info.image_size} and are not resized; set --image_size="
                          f"{info.image_size} or leave it 0 (native)")
    if not image_size:
        raise ConfigError(f"--image_size: required for --dataset {cfg.dataset}, whose images have "
                          "no common native size (e.g. --image_size=64)")
    num_classes = info.num_classes if cfg.class_conditional else 0
    return model_config_for(cfg, image_size, info.channels, num_classes), recipe_for(cfg)


def resolved_record(model_config: Any, recipe: uc.Recipe) -> dict[str, Any]:
    """What a run's flags resolved to, kept in its config.json under ``"resolved"``: the
    model config and the recipe, every default filled in. A later version of the code
    may resolve the same flags differently (a changed recipe default); a resume compares
    against this record, not against its own reading of the old flags."""
    return {"model": model_record(model_config), "recipe": json.loads(json.dumps(dataclasses.asdict(recipe)))}


def model_record(model_config: Any) -> dict[str, Any]:
    """A model config as the ``"resolved"`` record stores it (JSON values)."""
    return json.loads(json.dumps(dataclasses.asdict(model_config)))


# What a "resolved" record must hold to be compared at all: the model's shape (every
# record has had these; listed, not derived from ModelConfig, so that a field added later
# does not turn old records into malformed ones) and the masking and schedule that
# RECIPE_FLAGS set.
# A record without them would compare equal to any model or masking (only keys both
# sides have are compared) and so let every model and masking flag change.
_RECORD_KEYS = {
    "model": ("image_size", "patch_size", "in_channels", "width", "depth", "num_heads",
              "decoder_depth"),
    "recipe": RECIPE_FLAGS,
}


def recorded(old: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The ``"resolved"`` record of the config.json ``old`` (at ``path``), None if it has
    none (written before runs recorded it); ConfigError naming the file if it is not a
    model and a recipe as ``resolved_record`` writes them."""
    if "resolved" not in old:
        return None
    record = old["resolved"]
    problem = None
    if not isinstance(record, dict):
        problem = f"is {type(record).__name__}, not an object"
    else:
        for what, keys in _RECORD_KEYS.items():
            part = record.get(what)
            if not isinstance(part, dict):
                problem = f"has no {what!r} object"
                break
            missing = [k for k in keys if k not in part]
            if missing:
                problem = f"{what!r} lacks {', '.join(missing)}"
                break
    if problem:
        raise ConfigError(f'{path}: its "resolved" record {problem}; restore the file, delete '
                          '"resolved" from it to go by its flags alone, or use a new --workdir')
    return record


def _recorded_or_resolved(old: dict[str, Any], path: str, info: Any) -> dict[str, Any] | None:
    """``old``'s resolved record; for a config.json written before there was one, its
    flags resolved by this code (None if they no longer resolve)."""
    record = recorded(old, path)
    if record is not None:
        return record
    try:
        return resolved_record(*resolve(TrainConfig.from_json(old), info))
    except (ConfigError, TypeError, ValueError, AttributeError, KeyError):
        # A hand-edited value (--model Z/9, --arch nope) fails where the builders first use
        # it; the flags are then compared as written, which names the flag.
        return None


def resolved_differences(then: dict[str, Any], now: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, tuple]:
    # Only keys both sides have: a field added to the code since has no old value.
    return {k: (then[k], now[k]) for k in sorted(now) if k in then and k not in skip and then[k] != now[k]}


def _check_resume(cfg: TrainConfig, info: Any, now: dict[str, Any]) -> int | None:
    """The step a workdir resumes from (None: a fresh start), after checking that the
    flags (``now``: their ``resolved_record``) can resume it: the flags that must not
    change are unchanged, or changed only in spelling (they build the same model and
    masking), and this code builds from them the model and recipe that the run's
    config.json records. The label dropout may change
    (it is logged). Without a checkpoint there is nothing to resume: a config.json left by
    a run that stopped before its first checkpoint is simply replaced."""
    step = ckpt_lib.latest_step(cfg.workdir)
    path = os.path.join(cfg.workdir, "config.json")
    if step is None or not os.path.exists(path):
        return step
    old = read_config_json(path, "workdir")
    _check_resume_workers(cfg, old, path)
    _check_resume_processes(cfg, step)
    then = _recorded_or_resolved(old, path, info)
    if then is None:
        cfg.check_resume_compatible(old, path)
        return step
    _check_resume_examples(cfg, old, path, info)
    model_diff = resolved_differences(then["model"], now["model"])
    recipe_diff = resolved_differences(then["recipe"], now["recipe"], skip=("label_dropout",))
    equivalent = (() if model_diff else MODEL_FLAGS) + (() if recipe_diff else RECIPE_FLAGS)
    cfg.check_resume_compatible(old, path, equivalent)  # a changed flag is named first
    # With the flags unchanged, these fields come from the dataset (its channels, classes
    # and, under --image_size=0, its native size): they differ because --data_dir reads
    # other data than the run's, not because this version resolves the flags differently.
    from_data = {k: d for k, d in model_diff.items()
                 if k in ("in_channels", "num_classes") or (k == "image_size" and not cfg.image_size)}
    if from_data:
        raise ConfigError(
            f"--data_dir {cfg.data_dir}: its {cfg.dataset} data builds another model than the one "
            f"{path} records ("
            + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in from_data.items())
            + f"): the run trained on other data (--data_dir {old.get('data_dir')}). Resume with "
            "the run's data, or use a new --workdir")
    for what, diff in (("model", model_diff), ("recipe", recipe_diff)):
        if diff:
            raise ConfigError(
                f"--workdir {cfg.workdir}: the flags its run began with now build another "
                f"{what} than the one its config.json records ("
                + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
                + "): this version of unidiff resolves them differently. Resume with the version "
                "that began the run, or use a new --workdir")
    return step


def check_workdir_contents(workdir: str) -> None:
    """ConfigError naming the file unless what ``workdir`` holds is a unidiff run's, or
    nothing: a fresh start replaces config.json and the metrics, so in a directory of
    something else it would destroy that; checkpoints without config.json have lost the
    flags they were trained with (a resume would take any flags); a ``checkpoints`` that
    is not a directory made the first save hang for minutes."""
    if not os.path.isdir(workdir):
        return
    ckpts = os.path.join(workdir, "checkpoints")
    if os.path.lexists(ckpts) and not os.path.isdir(ckpts):
        raise ConfigError(f"--workdir {workdir}: {ckpts} is not a directory (checkpoints are "
                          "written there); move it away or use a new --workdir")
    config = os.path.join(workdir, "config.json")
    if os.path.exists(config):
        raw = read_config_json(config, "workdir")
        if not {"workdir", "recipe", "model", "dataset"} <= raw.keys():
            raise ConfigError(f"--workdir {workdir}: {config} is not a unidiff run's config.json, "
                              "and a run would overwrite it; use a new --workdir")
        try:
            TrainConfig.from_json(raw)
        except ConfigError as e:  # a run's config.json with a hand-edited value
            raise ConfigError(f"--workdir {workdir}: {config}: {e}; restore the file or use a "
                              "new --workdir") from None
    elif os.path.isdir(ckpts) and os.listdir(ckpts):
        raise ConfigError(f"--workdir {workdir}: it has checkpoints but no config.json, so the "
                          "flags they were trained with are unknown; restore config.json or use "
                          "a new --workdir")
    elif not _unidiff_metrics(os.path.join(workdir, "metrics.jsonl")):
        raise ConfigError(f"--workdir {workdir}: its metrics.jsonl is not a unidiff run's (lines "
                          "that are not step records, and no config.json beside it), and a run "
                          "would replace it; use a new --workdir")


def _unidiff_metrics(path: str) -> bool:
    """True unless ``path`` holds lines that no unidiff run writes: each line a JSON
    object with a "step" (a last line torn by a kill excepted)."""
    if not os.path.exists(path):
        return True
    try:
        with open(path) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError):
        return False
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and "step" in record
        except ValueError:
            ok = i == len(lines) - 1
        if not ok:
            return False
    return True


def _data_order(cfg: TrainConfig, resume_step: int | None) -> str:
    """The shuffle seeding of the run: a resume keeps the one its config.json records (a
    run begun before the record has the first scheme, which its saved position indexes);
    a fresh start takes the current one."""
    if resume_step is None:
        return ud.DATA_ORDERS[0]
    order = _resolved_field(read_config_json(os.path.join(cfg.workdir, "config.json"), "workdir"),
                            "data_order")
    if order is None:
        return "seed_plus_epoch"
    if order not in ud.DATA_ORDERS:
        raise ConfigError(f"--workdir {cfg.workdir}: its config.json records data order {order!r}, "
                          f"which this version does not know ({', '.join(ud.DATA_ORDERS)}); resume "
                          "with the version that began the run")
    return order


def _check_resume_examples(cfg: TrainConfig, old: dict[str, Any], path: str, info: Any) -> None:
    """The saved stream position indexes a shuffle of the run's N examples; over another
    number the permutation is another one (examples repeated or skipped within the epoch)
    and, under --epochs, the step count and LR schedule change mid-run."""
    then = _resolved_field(old, "num_examples")
    if isinstance(then, int) and not isinstance(then, bool) and then != info.num_examples:
        raise ConfigError(
            f"--data_dir {cfg.data_dir}: its {cfg.dataset} training split has "
            f"{info.num_examples} examples, but the run in {cfg.workdir} trained on {then} "
            f"({path}); its saved data order and step count belong to those. Resume with the "
            "run's data, or use a new --workdir")


def _check_resume_workers(cfg: TrainConfig, old: dict[str, Any], path: str) -> None:
    """Grain's saved position has one layout in process and another per worker count
    (``mp_prefetch`` keeps each worker's index), so a checkpoint restores only under the
    --num_workers that wrote it; a change failed at the restore, blamed on damaged files."""
    then = old.get("num_workers")
    if isinstance(then, int) and then != cfg.num_workers:
        raise ConfigError(
            f"--num_workers {cfg.num_workers}: the checkpoints in {cfg.workdir} saved the data "
            f"loader's position with --num_workers {then} ({path}), and Grain's saved position "
            f"depends on the worker count; resume with --num_workers={then}")


def _check_resume_processes(cfg: TrainConfig, step: int) -> None:
    """Each process saves its own share of the data loader's position, so a checkpoint
    restores only under as many processes as wrote it; another count failed at the
    restore, blamed on damaged files."""
    then = ckpt_lib.saved_process_count(cfg.workdir, step)
    if then is not None and then != jax.process_count():
        how = ("one process (no --coordinator_address)" if then == 1 else
               f"{then} processes (--num_processes={then})")
        raise ConfigError(
            f"--num_processes {jax.process_count()}: checkpoint step {step} in {cfg.workdir} saved "
            f"the data loader's position of {then} process{'es' if then != 1 else ''}, one part "
            f"per process; resume it with {how}")


# Flags that say how a run is executed, not what it trains: changing them on resume is
# not worth a record (--num_workers must match, _check_resume_workers).
OPERATIONAL_FLAGS = ("workdir", "data_dir", "log_every", "ckpt_every", "keep_checkpoints",
                     "num_workers", "num_devices", "microbatches", "stop_after", "max_nonfinite")


def _changed_flags(cfg: TrainConfig, old: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{flag: (old, new)} of the training flags that differ from ``old`` (a config.json
    that ``_check_resume`` accepted), ``now`` being what the new flags resolve to. The
    label dropout is compared as resolved where the old run recorded it: unset on both
    sides is still a change if the recipe's default changed in between."""
    new = cfg.to_json()
    changed = {k: (old[k], new[k]) for k in sorted(new)
               if k in old and old[k] != new[k] and k not in OPERATIONAL_FLAGS
               and k not in MODEL_FLAGS + RECIPE_FLAGS}  # accepted: only their spelling changed
    then = old.get("resolved")  # checked by _check_resume (recorded)
    if isinstance(then, dict) and "label_dropout" in then["recipe"]:
        a, b = then["recipe"]["label_dropout"], now["recipe"]["label_dropout"]
        changed.pop("label_dropout", None)
        if a != b:
            changed["label_dropout"] = (a, b)
    return changed


def prepare(cfg: TrainConfig) -> Run:
    """Validate everything that can be checked without compiling; raise ConfigError."""
    cfg.validate()
    try:  # here, not in validate(): the benchmark validates configs that never train
        check_output_dir("workdir", cfg.workdir)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_workdir_contents(cfg.workdir)
    try:
        info = ud.validate_data(cfg.dataset, cfg.data_dir, "train")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model_config, recipe = resolve(cfg, info)
    image_size = model_config.image_size
    num_classes = model_config.num_classes
    resume_step = _check_resume(cfg, info, resolved_record(model_config, recipe))
    num_tokens = (image_size // model_config.patch_size) ** 2
    try:
        recipe.validate_for(num_tokens)
    except ValueError as e:
        raise ConfigError(f"--recipe {cfg.recipe}: {e} (image has {num_tokens} tokens)") from None
    try:
        check_model_fits_recipe(model_config, recipe)
    except ValueError as e:
        raise ConfigError(f"--arch {cfg.resolved_arch()} does not fit --recipe {cfg.recipe}: {e}") from None

    num_devices = cfg.num_devices or jax.device_count()
    if num_devices > jax.device_count():
        raise ConfigError(f"--num_devices {num_devices}: only {jax.device_count()} devices exist")
    if jax.process_count() > 1 and num_devices != jax.device_count():
        # The mesh takes the first devices, all of them process 0's: the others would
        # feed their batch rows to no device of theirs.
        raise ConfigError(f"--num_devices {num_devices}: a run of {jax.process_count()} processes "
                          f"uses all {jax.device_count()} of their devices; leave --num_devices "
                          "at 0")
    if cfg.batch_size % num_devices:
        raise ConfigError(
            f"--batch_size {cfg.batch_size} is not divisible by the {num_devices} devices"
        )
    if cfg.batch_size % jax.process_count():
        raise ConfigError(
            f"--batch_size {cfg.batch_size} is not divisible by the {jax.process_count()} processes"
        )
    try:
        uc.split_batch(cfg.batch_size, recipe.r_t0, num_devices)
    except ValueError as e:
        raise ConfigError(f"--batch_size: {e}") from None
    try:
        check_microbatches(cfg.batch_size, recipe.r_t0, num_devices, cfg.microbatches)
    except ValueError as e:
        raise ConfigError(f"--microbatches {cfg.microbatches}: {e}") from None
    # Only a fresh start reads --init_from: a resume continues from its own checkpoints
    # even when the pretraining has moved since.
    if resume_step is None and cfg.init_from and not os.path.isdir(ckpt_lib.checkpoint_dir(cfg.init_from)):
        raise ConfigError(f"--init_from {cfg.init_from}: no checkpoints/ directory there")
    if resume_step is None and cfg.init_from and ckpt_lib.latest_step(cfg.init_from) is None:
        raise ConfigError(f"--init_from {cfg.init_from}: no complete checkpoint under checkpoints/ "
                          "(was its pretraining stopped before the first one?)")

    if cfg.train_steps > 0:
        total = cfg.train_steps
    else:
        total = max(1, int(cfg.epochs * info.num_examples // cfg.batch_size))
    if resume_step is not None and resume_step > total:
        flag = "train_steps" if cfg.train_steps > 0 else "epochs"
        raise ConfigError(f"--{flag}: the run in {cfg.workdir} is already at step {resume_step}, "
                          f"past the {total} steps asked for; use a new --workdir")
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else max(1, total // 20)
    source = ud.build_source(cfg.dataset, cfg.data_dir, "train")
    # The source decides what auto means, and the loader ANDs with it too; "true" where
    # it disallows flips would train unflipped while config.json claims flips.
    allow_flip = bool(getattr(source, "allow_flip", True))
    if cfg.flip == "true" and not allow_flip:
        raise ConfigError(f"--flip: true is refused for --dataset={cfg.dataset}: its images are "
                          "never mirrored (a mirrored digit is a different glyph); use --flip=auto "
                          "or --flip=false")
    flip = {"auto": allow_flip, "true": True, "false": False}[cfg.flip]
    return Run(cfg, recipe, model_config, source, image_size, num_classes, num_devices,
               total, warmup, flip, info, _data_order(cfg, resume_step))


# Flags a process may set for itself: where its copy of the data is mounted, and how
# many workers read it. Every other flag must be the same on every process.
_PER_PROCESS_FLAGS = ("data_dir", "num_workers")
_AGREED_FLAGS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in _PER_PROCESS_FLAGS)


def _flag_fingerprints(cfg: TrainConfig) -> list[int]:
    """A 31-bit hash of the value of each of ``_AGREED_FLAGS``, in that order."""
    return [int.from_bytes(hashlib.blake2b(json.dumps(getattr(cfg, name), sort_keys=True).encode(),
                                           digest_size=4).digest(), "little") >> 1
            for name in _AGREED_FLAGS]


class agreed_preparation:  # pylint: disable=invalid-name
    """Context manager around a binary's preparation (flags, data, workdir checks) in a
    multi-process run; a no-op with one process.

    A process whose preparation raised used to exit alone while the others went on into
    training and waited in its first collective until JAX's timeouts; and processes given
    different flags (another ``--seed`` or ``--batch_size``) trained inconsistently or
    hung. On leaving the block every process all-gathers whether it failed and a hash of
    each of its flags (``_flag_fingerprints``). A failed process raises its own error;
    the others raise ConfigError naming it, or naming the flags that differ. Set
    ``.cfg`` inside the block to the run's TrainConfig.

        with loop.agreed_preparation() as agreed:
            run = loop.prepare(cli.config_from_flags(FLAGS))
            agreed.cfg = run.cfg
    """

    def __init__(self):
        self.cfg: TrainConfig | None = None

    def __enter__(self) -> "agreed_preparation":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if jax.process_count() == 1:
            return False
        if exc_type is not None and not issubclass(exc_type, ValueError):
            return False  # not a refusal (KeyboardInterrupt, a bug): nothing to agree on
        failed = exc_type is not None or self.cfg is None
        prints = [0] * len(_AGREED_FLAGS) if failed else _flag_fingerprints(self.cfg)
        mine = np.asarray([int(failed)] + prints, np.int32)
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

        seen = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
        if exc_type is not None:
            return False  # this process's own error, as in a one-process run
        if failed:
            raise ConfigError("agreed_preparation: the block did not set .cfg")
        others = [int(i) for i in np.flatnonzero(seen[:, 0])]
        if others:
            raise ConfigError(
                f"process{'es' if len(others) > 1 else ''} {', '.join(map(str, others))} of "
                f"{jax.process_count()} refused the flags (see its log); every process stops")
        differ = [n for j, n in enumerate(_AGREED_FLAGS) if np.any(seen[:, j + 1] != seen[0, j + 1])]
        if differ:
            procs = [int(i) for i in np.flatnonzero(np.any(seen[:, 1:] != seen[0, 1:], axis=1))]
            raise ConfigError(
                f"{', '.join('--' + n for n in differ)}: differ between the processes of this run "
                f"(process{'es' if len(procs) > 1 else ''} {', '.join(map(str, procs))} against "
                f"process 0; this one has {', '.join(f'{n}={getattr(self.cfg, n)!r}' for n in differ)}); "
                "give every process the same flags (only "
                f"{', '.join('--' + n for n in _PER_PROCESS_FLAGS)} may differ)")
        return False


class _Stop:
    """SIGTERM/SIGINT flag checked between steps (no work happens in the handler)."""

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        self.signum = signum

    def install(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self)

    def agreed(self, failed: bool = False, skipped: int = 0) -> tuple[int | None, list[int], int]:
        """What every process of a multi-process run agrees on before a step, in one
        all-gather: the signal (the largest any process has caught), which processes
        ``failed`` (e.g. could not read their data), and the sum of the processes'
        ``skipped`` unreadable images (each loader counts its own shard's). A process
        that stopped alone, or a step later than the others, would leave them waiting in
        the step's collectives."""
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

        seen = np.asarray(multihost_utils.process_allgather(
            np.asarray([self.signum or 0, int(failed), skipped], np.int32))).reshape(-1, 3)
        return (int(seen[:, 0].max()) or None, [int(i) for i in np.flatnonzero(seen[:, 1])],
                int(seen[:, 2].sum()))


def _truncate_metrics(path: str, last_step: int) -> None:
    """Drop log lines past the restored step (they will be re-logged identically)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last_step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError):
                continue  # a line torn by a kill
    with atomic_write(path, "w") as f:
        f.writelines(keep)


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def lock_workdir(workdir: str):
    """An exclusive lock on ``workdir/.lock``, held while the returned file is open.

    Two runs writing one workdir would interleave checkpoints and metrics. The kernel
    drops a ``flock`` when its process exits, ``kill -9`` included, so a dead run
    never leaves the workdir locked. TrainingError if another run holds it.
    """
    path = os.path.join(workdir, ".lock")
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            # A filesystem without locks (some NFS mounts): run unlocked rather than never.
            log.warning("cannot lock %s (%s); running without the workdir lock", path, e)
            return f
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise TrainingError(f"--workdir {workdir}: another run ({holder}) is using it; wait for it "
                            "to finish or use another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def train(run: Run, init_params: Callable[[Any, jax.Array], Any] | None = None) -> dict:
    """Train to ``run.total_steps``, resuming from the workdir if it has a checkpoint.

    ``init_params(model, key) -> params`` overrides fresh initialisation (finetuning).
    Returns the last logged metrics. The workdir is locked for the run
    (``lock_workdir``; in a multi-host run process 0 holds the lock for all of them).
    """
    os.makedirs(run.cfg.workdir, exist_ok=True)
    lock, refused = None, None
    if jax.process_index() == 0:
        try:
            lock = lock_workdir(run.cfg.workdir)
        except TrainingError as e:
            refused = e
    if jax.process_count() > 1:
        # Every process must stop, not only the one that saw the lock held.
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

        if not multihost_utils.broadcast_one_to_all(np.int32(refused is None)):
            refused = refused or TrainingError(
                f"--workdir {run.cfg.workdir}: another run is using it (process 0 found it locked)")
    if refused is not None:
        raise refused
    try:
        return _train(run, init_params)
    except OSError as e:  # disk full, permissions, a timeout waiting on the filesystem
        raise TrainingError(_write_failure(run.cfg.workdir, e)) from None
    except ValueError as e:
        # orbax reports a failed asynchronous save (tensorstore's RESOURCE_EXHAUSTED, ...)
        # as a ValueError with pages of nested futures, at the next save after it.
        if not any(k in str(e) for k in _STORAGE_ERRORS):
            raise
        raise TrainingError(_write_failure(run.cfg.workdir, e)) from None
    finally:
        if lock is not None:
            lock.close()


_STORAGE_ERRORS = ("RESOURCE_EXHAUSTED", "No space left on device", "PERMISSION_DENIED", "Permission denied",
                   "Read-only file system", "Disk quota exceeded")


def _write_failure(workdir: str, e: BaseException) -> str:
    """One line for a run stopped by its storage: what failed, and where it can resume."""
    text = str(e)
    if isinstance(e, OSError) and e.strerror:
        what = f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    else:  # tensorstore's message: the OS's reason is at the end of a long line
        reason = next((k for k in _STORAGE_ERRORS[1:] if k in text), text.splitlines()[0][:200])
        step = re.search(r"checkpoints/(\d+)\.orbax-checkpoint-tmp", text)
        what = reason + (f", saving checkpoint step {step.group(1)}" if step else "")
    try:
        # On this process alone: in a multi-process run the others may not be here.
        good = ckpt_lib.latest_step(workdir, this_process_only=True)
    except Exception:  # pylint: disable=broad-except  # the directory itself may be unreadable
        good = None
    where = (f"the last complete checkpoint is step {good}; fix the storage and rerun the same "
             "command to resume from it" if good is not None else "no checkpoint was completed")
    return f"--workdir {workdir}: writing the run failed ({what}); {where}"


def _train(run: Run, init_params: Callable[[Any, jax.Array], Any] | None) -> dict:
    cfg = run.cfg
    config_path = os.path.join(cfg.workdir, "config.json")
    resolved = resolved_record(run.model_config, run.recipe)
    _check_resume(cfg, run.data_info, resolved)  # again: the workdir may have changed since prepare
    metrics_path = os.path.join(cfg.workdir, "metrics.jsonl")

    mesh = make_mesh(run.num_devices)
    model = um.Model(run.model_config)
    opt_cfg = OptimConfig(base_lr=cfg.base_lr, batch_size=cfg.batch_size,
                          total_steps=run.total_steps, warmup_steps=run.warmup_steps,
                          min_lr=cfg.min_lr, b1=cfg.b1, b2=cfg.b2,
                          weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
    optimizer = make_optimizer(opt_cfg)
    lr_fn = lr_schedule(opt_cfg)
    step_fn = make_train_step(
        model, run.recipe, optimizer, mesh, cfg.batch_size,
        StepConfig(patch_size=run.model_config.patch_size, num_classes=run.num_classes,
                   ema_decay=cfg.ema_decay, compute_dtype=cfg.compute_dtype,
                   microbatches=cfg.microbatches),
        lr_fn=lr_fn,
    )

    # The loader takes the global batch and yields this process's contiguous block of
    # it, so processes joined in order see exactly the single-process batch.
    data_iter = ud.make_loader(
        run.source, batch_size=cfg.batch_size, seed=cfg.seed, train=True,
        image_size=run.image_size, crop_area=(cfg.crop_area_min, cfg.crop_area_max),
        flip=run.flip, num_workers=cfg.num_workers,
        shard_index=jax.process_index(), shard_count=jax.process_count(), order=run.data_order,
    )

    root = jax.random.key(cfg.seed)
    init_key, state_key = jax.random.split(root)

    def fresh_state() -> TrainState:
        # Jitted: Haiku's init run op by op is many times slower than compiling it.
        params = init_params(model, init_key) if init_params else jax.jit(model.init)(init_key)
        return jax.jit(init_state, static_argnums=(1, 3))(
            params, optimizer, state_key, cfg.ema_decay > 0)

    checkpointer = ckpt_lib.Checkpointer(cfg.workdir, max_to_keep=cfg.keep_checkpoints)
    start = checkpointer.latest_step()
    try:
        if start is not None:
            # The pretrained init (finetuning) has the same structure as a fresh one.
            abstract = jax.eval_shape(
                lambda: init_state(model.init(init_key), optimizer, state_key, cfg.ema_decay > 0))
            everywhere = replicated(mesh)  # where replicate() puts a fresh state
            abstract = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=everywhere), abstract)
            state = checkpointer.restore(abstract, data_iter, start)
            log.info("resumed from %s at step %d", checkpointer.directory, start)
        else:
            state = fresh_state()  # a finetune's init_params reads its pretraining checkpoint
            start = 0
    except ckpt_lib.CheckpointReadError as e:
        checkpointer.close()
        raise TrainingError(str(e)) from None
    if jax.process_index() == 0:
        old = read_config_json(config_path, "workdir") if start and os.path.exists(config_path) else {}
        changed = _changed_flags(cfg, old, resolved)
        if changed:
            # The old flags described the steps so far: keep them next to the new ones
            # (written before config.json is replaced, so a kill loses neither).
            kept = os.path.join(cfg.workdir, f"config.step{start}.json")
            if not os.path.exists(kept):  # else it already holds the flags of those steps
                ckpt_lib.write_json_atomic(kept, old)
            log.warning("resuming at step %d with changed flags (%s); the previous config is "
                        "kept as %s", start, ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in
                                                       changed.items()), kept)
        if old and "resolved" not in old:
            log.warning("%s records only flags, not what they resolved to (written by an older "
                        "unidiff): the steps from %d on train with recipe %s", config_path, start,
                        resolved["recipe"])
        moved = _device_change_warning(old, cfg.batch_size, run.recipe.r_t0, run.num_devices)
        if moved:
            log.warning("resuming at step %d: %s", start, moved)
        # Only now: a restore that fails leaves config.json describing the checkpoints.
        # The device count is recorded because it decides the clean rows per step, the
        # example count because the saved data order is a permutation of that many.
        ckpt_lib.write_json_atomic(config_path, {**cfg.to_json(), "resolved": {
            **resolved, "num_devices": run.num_devices,
            "num_examples": int(run.data_info.num_examples), "data_order": run.data_order}})
        # Records past the checkpoint (all of them on a fresh start: a run killed before
        # its first checkpoint) are re-logged by the steps that follow.
        _truncate_metrics(metrics_path, start)
    state = replicate(state, mesh)

    stop = _Stop()
    stop.install()
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.params))
    log.info("model %s (%s arch, %.2fM params), recipe %s, %d devices, batch %d%s, %d steps",
             cfg.model, cfg.resolved_arch(), n_params / 1e6, cfg.recipe, run.num_devices,
             cfg.batch_size, f" in {cfg.microbatches} microbatches" if cfg.microbatches > 1 else "",
             run.total_steps)
    rounded = clean_rows_warning(cfg.batch_size, run.recipe.r_t0, run.num_devices)
    if rounded:
        log.warning("%s", rounded)

    last: dict = {}
    window_start, window_steps = time.perf_counter(), 0
    run_start, run_start_step = window_start, start
    metrics_file = open(metrics_path, "a") if jax.process_index() == 0 else None
    step, skipped_logged = start, 0
    end = run.total_steps if cfg.stop_after == 0 else min(run.total_steps, start + cfg.stop_after)

    def check_nonfinite() -> None:
        # Reading the counter waits for the step that produced it.
        if int(state.nonfinite_run) >= cfg.max_nonfinite:
            good = checkpointer.latest_step()
            where = (f"the last good checkpoint is step {good} in {checkpointer.directory}"
                     if good is not None else "no checkpoint was saved before them")
            raise TrainingError(
                f"stopping at step {step}: {int(state.nonfinite_run)} consecutive "
                f"steps with a non-finite loss or gradient norm, skipped (--max_nonfinite "
                f"{cfg.max_nonfinite}); {where}. Lower --base_lr or check the data."
            )

    unchecked = False  # the last step's non-finite count is still to be read
    multi_process = jax.process_count() > 1
    pending_failure: BaseException | None = None  # multi-process: raised at the next agreement
    try:
        with jax.set_mesh(mesh):
            while step < end:
                # The next batch is read and sent to the devices while the last step still
                # runs; only then is its non-finite count read (which waits for it), before
                # the next step is dispatched and donates that state.
                failure = pending_failure
                try:
                    examples = next(data_iter)
                except ud.DataError as e:
                    good = checkpointer.latest_step()
                    failure = TrainingError(
                        f"--data_dir {cfg.data_dir}: at step {step + 1}: {e}; "
                        + (f"the last checkpoint is step {good}" if good is not None
                           else "no checkpoint was saved"))
                    if not multi_process:
                        raise failure from None
                if failure is None:
                    batch = shard_batch(examples, mesh, cfg.batch_size)
                if unchecked:
                    check_nonfinite()
                skipped_images = int(data_iter.num_skipped)
                if multi_process:
                    # Agreed before the step, while the devices are idle (the last step
                    # has been waited for): every process then saves this step and
                    # exits, or every process stops for one that failed; the skipped
                    # images become all processes' count.
                    signum, failed, skipped_images = stop.agreed(failure is not None, skipped_images)
                    if failed:
                        if failure is not None:
                            raise failure from None
                        raise TrainingError(
                            f"stopping before step {step + 1}: process{'es' if len(failed) > 1 else ''} "
                            f"{', '.join(map(str, failed))} of {jax.process_count()} failed (see "
                            "its log)")
                state, metrics = step_fn(state, batch)
                step += 1
                window_steps += 1
                log_now = step % cfg.log_every == 0 or step == run.total_steps
                if not multi_process:
                    # Read once: a signal arriving after this is seen at the next step,
                    # never between the save and the exit.
                    signum = stop.signum
                save_now = step % cfg.ckpt_every == 0 or step == end or signum is not None
                unchecked = not (log_now or save_now)
                if not unchecked:  # nothing is logged or saved past the limit
                    check_nonfinite()
                if log_now:
                    m = jax.device_get(metrics)
                    now = time.perf_counter()
                    ips = window_steps * cfg.batch_size / (now - window_start)
                    rate = (step - run_start_step) / max(now - run_start, 1e-9)
                    last = {k: float(v) for k, v in m.items() if k != "finite"}
                    last.update(step=step, images_per_s=ips,
                                nonfinite_total=int(state.nonfinite_total),
                                skipped_images=skipped_images)
                    parts = " ".join(
                        f"{k[5:]} {last[k]:.4f}" for k in sorted(last)
                        if k.startswith("loss_")
                    )
                    log.info(
                        "step %d/%d loss %.4f%s lr %.3g %.1f img/s ETA %s",
                        step, run.total_steps, last["loss"], f" ({parts})" if parts else "",
                        last.get("lr", math.nan), ips,
                        _fmt_eta((run.total_steps - step) / max(rate, 1e-9)),
                    )
                    if last["skipped_images"] > skipped_logged:
                        log.warning("skipped %d unreadable images so far (see the log above "
                                    "for their paths)", last["skipped_images"])
                        skipped_logged = last["skipped_images"]
                    if metrics_file is not None:
                        try:
                            metrics_file.write(json.dumps(last, sort_keys=True) + "\n")
                            metrics_file.flush()
                        except OSError as e:  # e.g. a full disk, on process 0 alone
                            if not multi_process:
                                raise
                            # Raised where all processes agree, so none is left waiting.
                            pending_failure = e
                    window_start, window_steps = time.perf_counter(), 0
                if save_now:
                    if checkpointer.latest_step() != step:
                        checkpointer.save(step, state, data_iter, force=True)
                if signum is not None:
                    log.info("signal %d: saved step %d, exiting", signum, step)
                    break
        checkpointer.wait()
        if pending_failure is not None:  # the last step's: no agreement came after it
            raise pending_failure
    finally:
        if metrics_file is not None:
            metrics_file.close()
        checkpointer.close()
    return last


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
        stream=sys.stdout, force=True,
    )
    logging.getLogger("absl").setLevel(logging.WARNING)
