"""The run configuration shared by the pretrain and finetune binaries, validated up front.

Every check here runs before any data is read or anything is compiled, and a failure
names the flag that is wrong and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from collections.abc import Collection
from typing import Any

RECIPES = ("umd", "umd_finetune", "mae", "dit", "maskdit", "mdt", "usp")
SCHEDULES = ("auto", "cosine", "linear")
ARCHS = ("auto", "umd", "umd_no_adaln", "mae", "mdt", "maskdit", "dit", "dit_affine")
# The UMD paper runs every baseline on the same encoder-decoder, MAE without AdaLN;
# USP is MAE with MAE's own 512x8 decoder; MDT needs its side-interpolater.
DEFAULT_ARCH = {"mae": "umd_no_adaln", "usp": "mae", "mdt": "mdt"}
# What a finetune copies from its pretraining run so that the parameters fit
# (``unidiff.train.workdir.inherited_flags``).
INHERITED = ("model", "arch", "image_size", "num_cls_tokens", "si_position")


def resolve_arch(recipe: str, arch: str = "auto") -> str:
    """The architecture ``--arch`` means for ``--recipe``: ``auto`` picks by recipe."""
    return DEFAULT_ARCH.get(recipe, "umd") if arch == "auto" else arch


class ConfigError(ValueError):
    """A bad flag; the message names it, and ``flag`` is that flag's name (no dashes).

    ``flag`` defaults to the ``--name`` the message starts with (every message here does),
    or None when it names no flag first (a damaged file, a problem of several flags)."""

    def __init__(self, message: str, flag: str | None = None):
        super().__init__(message)
        if flag is None:
            named = re.match(r"--(\w+)", message)
            flag = named.group(1) if named else None
        self.flag = flag


def read_config_json(path: str, flag: str) -> dict[str, Any]:
    """A workdir's ``config.json`` as a dict; ConfigError naming ``--flag`` and the file."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--{flag}: cannot read {path} ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--{flag}: {path} is not a JSON object of training flags")
    return raw


def _json_value_fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the type of a TrainConfig field (a JSON integer serves
    a float field; a boolean is neither)."""
    for tp in typing.get_args(hint) or (hint,):
        if value is None and tp is type(None):
            return True
        if isinstance(value, bool):
            if tp is bool:
                return True
        elif (tp is int and isinstance(value, int)) or (tp is float and isinstance(value, (int, float))) \
                or (tp is str and isinstance(value, str)):
            return True
    return False


def _type_words(hint: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             type(None): "null"}
    return " or ".join(names[tp] for tp in typing.get_args(hint) or (hint,))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    workdir: str
    recipe: str = "umd"
    arch: str = "auto"
    model: str = "B/4"
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int = 0  # 0 = the dataset's native size
    batch_size: int = 256
    train_steps: int = 0
    epochs: float = 0.0
    base_lr: float = 1.5e-4
    min_lr: float = 0.0
    warmup_steps: int = -1  # -1 = 5% of the run (40 of 800 epochs in the paper)
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    compute_dtype: str = "float32"
    num_workers: int = 0
    crop_area_min: float = 0.8
    crop_area_max: float = 1.0
    flip: str = "auto"  # auto = on where the source allows it (not digits)
    r_t0: float | None = None
    m_t0: float | None = None
    m_t: float | None = None
    label_dropout: float | None = None
    schedule: str = "auto"  # auto = linear on latents (REFERENCE §1), else the recipe's own
    class_conditional: bool = False
    num_cls_tokens: int = -1  # -1 = the architecture's default
    si_position: int | None = None  # --arch mdt only; None = MDT's -2
    max_nonfinite: int = 10
    num_devices: int = 0  # 0 = all devices
    microbatches: int = 1  # gradient accumulation: sequential chunks of each device's rows
    init_from: str | None = None  # finetune: a pretraining workdir
    stop_after: int = 0  # run at most this many steps in this process, then checkpoint

    def resolved_arch(self) -> str:
        return resolve_arch(self.recipe, self.arch)

    def validate(self) -> None:
        def fail(flag: str, msg: str) -> None:
            raise ConfigError(f"--{flag}: {msg}", flag=flag)

        if not self.workdir:
            fail("workdir", "is required (a directory for checkpoints and metrics)")
        if self.recipe not in RECIPES:
            fail("recipe", f"got {self.recipe!r}, expected one of {', '.join(RECIPES)}")
        if self.arch not in ARCHS:
            fail("arch", f"got {self.arch!r}, expected one of {', '.join(ARCHS)}")
        if self.batch_size < 1:
            fail("batch_size", f"must be >= 1, got {self.batch_size}")
        if not math.isfinite(self.epochs):
            fail("epochs", f"must be a finite number, got {self.epochs}")
        if self.train_steps < 0 or self.epochs < 0:
            fail("train_steps" if self.train_steps < 0 else "epochs",
                 f"must be >= 0, got {self.train_steps if self.train_steps < 0 else self.epochs}")
        if (self.train_steps > 0) == (self.epochs > 0):
            fail("train_steps", "set exactly one of --train_steps or --epochs to a positive value")
        if self.warmup_steps < -1:
            fail("warmup_steps", f"must be >= 0, or -1 for 5% of the run; got {self.warmup_steps}")
        if self.seed < 0:
            fail("seed", f"must be >= 0, got {self.seed}")
        if self.image_size < 0:
            fail("image_size", f"must be >= 0 (0 = native size), got {self.image_size}")
        if self.num_cls_tokens < -1:
            fail("num_cls_tokens", f"must be >= 0, or -1 for the architecture's default; got "
                 f"{self.num_cls_tokens}")
        for flag in ("base_lr", "min_lr", "weight_decay"):
            v = getattr(self, flag)
            if not (math.isfinite(v) and v >= 0):  # written so that NaN fails too
                fail(flag, f"must be a finite number >= 0, got {v}")
        peak_lr = self.base_lr * self.batch_size / 256
        if self.min_lr > peak_lr:
            fail("min_lr", f"{self.min_lr} is above the peak learning rate {peak_lr:.3g} "
                 f"(--base_lr {self.base_lr} x --batch_size {self.batch_size} / 256); the cosine "
                 "decays from the peak to min_lr")
        if not math.isfinite(self.grad_clip):
            fail("grad_clip", f"must be a finite number (<= 0 disables clipping), got {self.grad_clip}")
        for flag in ("b1", "b2", "ema_decay"):
            v = getattr(self, flag)
            if not 0.0 <= v < 1.0:
                fail(flag, f"must be in [0, 1), got {v}")
        for flag in ("m_t0", "m_t"):
            v = getattr(self, flag)
            if v is not None and not 0.0 <= v < 1.0:
                fail(flag, f"mask ratio must be in [0, 1), got {v}")
        if self.r_t0 is not None and not 0.0 <= self.r_t0 <= 1.0:
            fail("r_t0", f"must be in [0, 1], got {self.r_t0}")
        if self.label_dropout is not None and not 0.0 <= self.label_dropout <= 1.0:
            fail("label_dropout", f"must be in [0, 1], got {self.label_dropout}")
        if self.schedule not in SCHEDULES:
            fail("schedule", f"got {self.schedule!r}, expected one of {', '.join(SCHEDULES)}")
        if not 0.0 < self.crop_area_min <= self.crop_area_max <= 1.0:
            fail("crop_area_min", "need 0 < crop_area_min <= crop_area_max <= 1, got "
                 f"{self.crop_area_min}, {self.crop_area_max}")
        if self.flip not in ("auto", "true", "false"):
            fail("flip", f"expected auto, true or false, got {self.flip!r}")
        if self.log_every < 1:
            fail("log_every", f"must be >= 1, got {self.log_every}")
        if self.ckpt_every < 1:
            fail("ckpt_every", f"must be >= 1, got {self.ckpt_every}")
        if self.keep_checkpoints < 1:
            fail("keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            fail("compute_dtype", f"expected float32 or bfloat16, got {self.compute_dtype!r}")
        if self.num_workers < 0:
            fail("num_workers", f"must be >= 0, got {self.num_workers}")
        if self.max_nonfinite < 1:
            fail("max_nonfinite", f"must be >= 1, got {self.max_nonfinite}")
        if self.stop_after < 0:
            fail("stop_after", f"must be >= 0 (0 = run to the end), got {self.stop_after}")
        if self.si_position is not None and self.resolved_arch() != "mdt":
            fail("si_position", f"only applies to the mdt architecture (the side-interpolater), "
                 f"but --arch resolves to {self.resolved_arch()!r} for --recipe {self.recipe}")
        if self.num_devices < 0:
            fail("num_devices", f"must be >= 0 (0 = all), got {self.num_devices}")
        if self.microbatches < 1:
            fail("microbatches", f"must be >= 1 (1 = the whole batch at once), got {self.microbatches}")

    # Changing these under an existing workdir would silently corrupt a resumed run.
    RESUME_KEYS = ("recipe", "arch", "model", "dataset", "image_size", "batch_size",
                   "r_t0", "m_t0", "m_t", "schedule", "class_conditional", "num_cls_tokens",
                   "si_position", "compute_dtype", "seed")

    # Whether these are on decides the checkpoint's structure (EMA parameters; the clip's
    # optimizer state), so a resumed run cannot switch them; their values may change.
    RESUME_SWITCHES = {"ema_decay": "EMA", "grad_clip": "gradient clipping"}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "TrainConfig":
        """The TrainConfig of a config.json's dict. Keys it does not know (``"resolved"``,
        flags of a newer version) are left out; TypeError if a required one is missing,
        ConfigError naming the key if a value has the wrong type."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        hints = typing.get_type_hints(cls)
        for key, value in kwargs.items():
            # A hand-edited file ("image_size": "8") would otherwise fail far from here,
            # as a traceback from whichever builder first uses the value.
            if not _json_value_fits(value, hints[key]):
                raise ConfigError(f"{key!r} is {json.dumps(value)}, expected "
                                  f"{_type_words(hints[key])}")
        return cls(**kwargs)

    def check_resume_compatible(self, old: dict[str, Any], path: str,
                                equivalent: Collection[str] = ()) -> None:
        """ConfigError unless these flags can resume the run whose config.json (at
        ``path``) is ``old``. Keys in ``equivalent`` are not compared: the caller found
        that their old and new values build the same model and recipe (e.g.
        ``--si_position=-2`` where the run left MDT's default, or ``--arch=umd`` for
        ``auto``)."""
        for key, what in self.RESUME_SWITCHES.items():
            if isinstance(old.get(key), (int, float)) and (old[key] > 0) != (getattr(self, key) > 0):
                state = "on" if getattr(self, key) > 0 else "off"
                raise ConfigError(
                    f"--{key}: {getattr(self, key)!r} turns {what} {state}, but the run in {path} has "
                    f"{old[key]!r}; its checkpoints cannot be resumed that way. Use a new --workdir "
                    f"or keep {what} {'off' if state == 'on' else 'on'}"
                )
        for key in self.RESUME_KEYS:
            if key in old and key not in equivalent and old[key] != getattr(self, key):
                raise ConfigError(
                    f"--{key}: {getattr(self, key)!r} differs from {old[key]!r} in {path}; "
                    "use a new --workdir or the original value to resume"
                )
