"""Rebuild a trained model from a training workdir, for the sample and probe binaries.

A workdir written by ``experiments/pretrain.py`` or ``experiments/finetune.py`` holds
``config.json`` (the ``TrainConfig``) and ``checkpoints/``. ``load_workdir`` turns the
config back into the exact ``ModelConfig`` the run trained (same builder as
``loop.prepare``: the dataset gives channels and, for class-conditional runs, the number
of classes), and ``load_params`` restores the (EMA) parameters and checks that they fit
that model. Every failure is a ``ConfigError`` naming the flag or file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np

from unidiff import corruption as uc
from unidiff import data as ud
from unidiff import models as um
from unidiff.train import checkpoint as ckpt_lib
from unidiff.train.config import INHERITED, ConfigError, TrainConfig, read_config_json, resolve_arch
from unidiff.train.loop import model_record, recorded, resolve, resolved_differences, resolved_record

log = logging.getLogger("unidiff")


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A workdir's model (without parameters) and the facts needed to use it."""

    workdir: str
    cfg: TrainConfig
    model: um.Model
    recipe: uc.Recipe
    schedule: uc.Schedule
    image_size: int
    channels: int
    num_classes: int  # classes the model is conditioned on; 0 = unconditional
    dataset_classes: int  # classes of the dataset (for the probe), 0 = unlabeled
    data_dir: str | None
    latent: bool  # trained on latents: no pixel clipping, no uint8 images

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def noisy_only(self) -> bool:
        """Trained only on noisy steps (r_t0 = 0: DiT, MaskDiT, MDT; the finetune recipe has 0.05)."""
        return self.recipe.r_t0 == 0.0


def _config_json(workdir: str, flag: str) -> tuple[str, dict[str, Any]]:
    """(path, contents) of ``workdir/config.json``; ConfigError naming ``--flag`` or the file."""
    if not workdir:
        raise ConfigError(f"--{flag}: required (a pretrain.py / finetune.py workdir)")
    if not os.path.isdir(workdir):
        raise ConfigError(f"--{flag} {workdir}: not a directory")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--{flag} {workdir}: no config.json there; is it a pretrain.py "
                          "or finetune.py workdir?")
    return path, read_config_json(path, flag)


def _train_config(path: str, raw: dict[str, Any]) -> TrainConfig:
    try:
        # Unknown keys may come from a newer version; everything the model needs is known.
        return TrainConfig.from_json(raw)
    except (TypeError, ConfigError) as e:
        raise ConfigError(f"{path}: {e}") from None


def read_config(workdir: str, flag: str = "workdir") -> TrainConfig:
    """``workdir/config.json`` as a TrainConfig; ConfigError naming ``--flag`` or the file."""
    return _train_config(*_config_json(workdir, flag))


def load_workdir(workdir: str, data_dir: str | None = None, flag: str = "workdir") -> TrainedModel:
    """The model a workdir trained, rebuilt from its config.json (no parameters loaded).

    ``data_dir`` overrides the config's ``data_dir`` (the dataset is read for its channels
    and classes, so it must be reachable from this machine).
    """
    path, raw = _config_json(workdir, flag)
    cfg = _train_config(path, raw)
    data_dir = data_dir or cfg.data_dir
    try:
        info = ud.validate_data(cfg.dataset, data_dir, "train")
    except ValueError as e:
        raise ConfigError(
            f"--{flag} {workdir}: cannot read its dataset ({cfg.dataset}) for the model's "
            f"channels and classes: {e}; pass --data_dir"
        ) from None
    try:
        model_config, recipe = resolve(cfg, info)  # as the run's prepare did
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    model_config, recipe = as_recorded(path, raw, model_config, recipe)
    return TrainedModel(
        workdir=workdir, cfg=cfg, model=um.Model(model_config), recipe=recipe,
        schedule=uc.make_schedule(recipe.schedule, recipe.num_steps),
        image_size=model_config.image_size, channels=model_config.in_channels,
        num_classes=model_config.num_classes,
        dataset_classes=info.num_classes, data_dir=data_dir,
        latent=cfg.dataset == "latents",
    )


def as_recorded(path: str, raw: dict[str, Any], model_config: um.ModelConfig, recipe: uc.Recipe
                ) -> tuple[um.ModelConfig, uc.Recipe]:
    """The model config and recipe that the config.json ``raw`` (at ``path``) records its run
    trained (``"resolved"``, written since runs record it), where this code resolves the
    run's flags to something else, e.g. a default changed since; a warning names the
    fields. ``model_config`` and ``recipe`` (built from the flags) otherwise."""
    record = recorded(raw, path)
    if record is None:
        return model_config, recipe
    now = resolved_record(model_config, recipe)
    out = []
    for what, built in (("model", model_config), ("recipe", recipe)):
        diff = resolved_differences(record[what], now[what])
        if diff:
            try:
                built = dataclasses.replace(built, **{k: then for k, (then, _) in diff.items()})
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{path}: records a {what} that this version cannot rebuild "
                                  f"({e})") from None
            # Either a default changed since the run or --data_dir reads other data.
            log.warning("%s: the run's flags now build another %s (%s), from this version's "
                        "defaults or the data read; using the one the run trained", path, what,
                        ", ".join(f"{k} {b!r} instead of {a!r}" for k, (a, b) in diff.items()))
        out.append(built)
    return out[0], out[1]


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(p): tuple(np.shape(v))
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_params(trained: TrainedModel, use_ema: bool = True) -> tuple[Any, int]:
    """(params, step) of the workdir's latest checkpoint, checked against the model.

    ``use_ema``: the EMA parameters when the run kept them (``ema_decay`` > 0), else the
    raw ones.
    """
    workdir = trained.workdir
    if ckpt_lib.latest_step(workdir) is None:
        raise ConfigError(f"--workdir {workdir}: no checkpoint under "
                          f"{ckpt_lib.checkpoint_dir(workdir)}; train it first (pretrain.py / finetune.py)")
    try:
        params, step = ckpt_lib.restore_params(workdir, use_ema=use_ema)
    except (FileNotFoundError, ckpt_lib.CheckpointReadError) as e:
        raise ConfigError(str(e)) from None
    expected = _shapes(jax.eval_shape(trained.model.init, jax.random.key(0)))
    got = _shapes(params)
    if expected != got:
        missing = sorted(set(expected) - set(got))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise ConfigError(
            f"--workdir {workdir}: checkpoint step {step} does not fit the model of its "
            f"config.json ({len(missing)} missing, {len(wrong)} mis-shaped parameters, e.g. "
            f"{(missing + wrong)[:2]})"
        )
    params = jax.tree.map(lambda a: jax.numpy.asarray(a, jax.numpy.float32), params)
    return params, step


def inherited_flags(init_from: str, recipe: str, dataset: str, data_dir: str | None = None,
                    workdir: str | None = None) -> dict[str, Any]:
    """The architecture flags (``INHERITED``) for a finetune from the pretraining workdir
    ``init_from`` with ``recipe`` on ``dataset`` (``data_dir``) into ``workdir``.

    A finetune ``workdir`` that already has a checkpoint keeps the values it was started
    with (its own config.json), so it resumes as it began. Otherwise they come from the
    pretraining, with ``arch=auto`` and ``image_size=0`` pinned to what the pretraining
    resolved them to: the finetune's recipe and dataset would resolve them to another
    model (an MAE pretraining, ``umd_no_adaln``, would come back as ``umd`` under
    ``umd_finetune``; another dataset, or another directory of the same one, has its
    own native size).
    """
    if workdir and ckpt_lib.latest_step(workdir) is not None:
        own = read_config(workdir, "workdir")
        return {k: getattr(own, k) for k in INHERITED}
    path, raw = _config_json(init_from, "init_from")
    pre = _train_config(path, raw)
    fixed = {k: getattr(pre, k) for k in INHERITED}
    if pre.arch == "auto" and pre.resolved_arch() != resolve_arch(recipe):
        fixed["arch"] = pre.resolved_arch()
    record = recorded(raw, path) if pre.image_size == 0 else None
    if record is not None:
        # The size the pretraining trained at, whatever its data directory holds now.
        fixed["image_size"] = int(record["model"]["image_size"])
    elif pre.image_size == 0:
        try:
            info = ud.validate_data(pre.dataset, pre.data_dir, "train")
        except ValueError as e:
            if dataset != pre.dataset:
                raise ConfigError(
                    f"--init_from {init_from}: trained at the native size of {pre.dataset} in "
                    f"{pre.data_dir}, which cannot be read here to learn that size ({e})") from None
            info = ud.validate_data(dataset, data_dir, "train")  # moved: the finetune's copy
        fixed["image_size"] = info.image_size
    return fixed


def recorded_model(init_from: str) -> dict[str, Any] | None:
    """The model config that the pretraining workdir ``init_from`` recorded it trained
    (its config.json's ``"resolved"`` record), None for a config.json written before
    runs recorded it."""
    path, raw = _config_json(init_from, "init_from")
    record = recorded(raw, path)
    return None if record is None else record["model"]


def check_finetune_fits(init_from: str, model_config: um.ModelConfig, dataset: str) -> None:
    """ConfigError unless ``model_config`` (the finetune's model, or the pretraining's as
    a USP transfer rebuilds it) is the model the pretraining ``init_from`` recorded, but
    for the label table a finetune adds. A dataset with other channels (or a code default
    changed since the pretraining) would otherwise be found only when the parameters are
    merged, after the run has started."""
    then = recorded_model(init_from)
    if then is None:
        return
    diff = resolved_differences(then, model_record(model_config), skip=("num_classes",))
    if diff:
        raise ConfigError(
            f"--init_from {init_from}: on --dataset {dataset} the flags build another model "
            "than the one its pretraining recorded ("
            + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
            + "); finetune on data like the pretraining's, with the unidiff version that ran it")
