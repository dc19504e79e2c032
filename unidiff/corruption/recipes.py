"""Training recipes: which corruption and which loss, as one hashable value.

A :class:`Recipe` fixes everything about corruption that must be static under ``jit``:
the clean-step fraction r_t0, the clean-step and noisy-step mask ratios m_t0 and m_t,
the schedule, and which loss terms apply where. It is a frozen dataclass, so it can be
passed as a static argument to ``jax.jit`` and used as a dictionary key.

The presets below are the special cases of the UMD objective (UMD paper, Eq. 4-6 and
Sec. 3: "r_t0 = 1, m_t0 = 0.75 recovers MAE; r_t0 = 0, m_t = 0.5 MaskDiT; r_t0 = 0,
m_t = 0 DiT") plus the two latent-space methods UMD is compared with (MDT, USP). Every
preset is a function taking keyword overrides, e.g. ``umd(num_steps=50)``.

Branch order (see :meth:`Recipe.branch_names`): rows ``[0, num_clean)`` form the
``"clean"`` branch, the remaining rows the ``"noisy"`` branch; with MDT-style two-pass
training the noisy rows give two branches, ``"full"`` (no mask) and ``"masked"`` (m_t).
A branch with no rows is omitted.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Callable

from unidiff.corruption.masking import num_kept
from unidiff.corruption.schedule import SCHEDULE_KINDS

NOISY_LOSSES = ("eps_x0", "eps_all")
CLEAN_LOSSES = ("x0_hidden",)


def _check_ratio(name: str, value, *, closed: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
    if not ok:
        interval = "[0, 1]" if closed else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated, hashable corruption + loss recipe (defaults: UMD pretraining).

    Attributes:
      name: label used in logs and checkpoints.
      r_t0: fraction of each batch that takes the clean step (t = 0), in [0, 1].
      m_t0: mask ratio of the clean branch, in [0, 1); must be > 0 when r_t0 > 0,
        because the clean branch is trained only on hidden tokens.
      m_t: mask ratio of the noisy branch (of the masked pass under two-pass
        training), in [0, 1); 0 means the noisy branch is not masked.
      schedule: ``"cosine"`` (pixels) or ``"linear"`` (latents).
      num_steps: T, the number of noisy diffusion steps.
      noisy_loss: ``"eps_x0"`` = 1/2 (eps MSE on visible tokens + x0 MSE on hidden
        tokens), both over all tokens without a mask (UMD Eq. 4); ``"eps_all"`` = eps
        MSE over all tokens, visible and hidden (MDT).
      clean_loss: ``"x0_hidden"`` = x0 MSE on hidden tokens only (UMD Eq. 5 = MAE).
      norm_pix_loss: normalise every x0 target patch by its own mean and variance
        (MAE/USP); needs an x0 prediction head.
      mdt_two_pass: MDT training: every noisy row is run twice with the same t and
        independent noise, once unmasked and once masked at m_t; the two losses are
        summed.
      label_dropout: probability of replacing a label by the null class. Not used by
        the corruption functions; the train step applies it.
    """

    name: str = "umd"
    r_t0: float = 0.5
    m_t0: float = 0.75
    m_t: float = 0.375
    schedule: str = "cosine"
    num_steps: int = 1000
    noisy_loss: str = "eps_x0"
    clean_loss: str = "x0_hidden"
    norm_pix_loss: bool = False
    mdt_two_pass: bool = False
    label_dropout: float = 0.0

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        set_("r_t0", _check_ratio("r_t0", self.r_t0, closed=True))
        set_("m_t0", _check_ratio("m_t0", self.m_t0, closed=False))
        set_("m_t", _check_ratio("m_t", self.m_t, closed=False))
        set_("label_dropout", _check_ratio("label_dropout", self.label_dropout, closed=False))
        if self.schedule not in SCHEDULE_KINDS:
            raise ValueError(f"schedule must be one of {SCHEDULE_KINDS}, got {self.schedule!r}")
        if (
            isinstance(self.num_steps, bool)
            or not isinstance(self.num_steps, numbers.Integral)
            or self.num_steps < 1
        ):
            raise ValueError(f"num_steps must be an integer >= 1, got {self.num_steps!r}")
        set_("num_steps", int(self.num_steps))
        if self.noisy_loss not in NOISY_LOSSES:
            raise ValueError(f"noisy_loss must be one of {NOISY_LOSSES}, got {self.noisy_loss!r}")
        if self.clean_loss not in CLEAN_LOSSES:
            raise ValueError(f"clean_loss must be one of {CLEAN_LOSSES}, got {self.clean_loss!r}")
        for flag in ("norm_pix_loss", "mdt_two_pass"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        if self.r_t0 > 0 and self.m_t0 == 0:
            raise ValueError(
                f"m_t0 must be > 0 when r_t0 > 0 (got r_t0={self.r_t0}): the clean branch "
                "is trained only on hidden tokens"
            )
        if self.mdt_two_pass and self.m_t == 0:
            raise ValueError("m_t must be > 0 when mdt_two_pass is set: the second pass is masked at m_t")

    # -- conveniences -------------------------------------------------------------

    def replace(self, **overrides) -> "Recipe":
        """A copy with some fields changed (validated again)."""
        _check_fields(overrides)
        return dataclasses.replace(self, **overrides)

    @property
    def has_clean(self) -> bool:
        """Whether this recipe ever builds a clean branch (r_t0 > 0)."""
        return self.r_t0 > 0

    @property
    def has_noisy(self) -> bool:
        """Whether this recipe ever builds noisy branches (r_t0 < 1)."""
        return self.r_t0 < 1

    def keep_counts(self, num_tokens: int) -> tuple[int | None, int | None]:
        """Static visible-token counts (K_clean, K_noisy) for L = num_tokens.

        None for a branch the recipe never builds; L for an unmasked branch. K_noisy is
        the masked pass's count under two-pass training. ValueError naming m_t0 or m_t
        when a ratio would keep no token at all.
        """
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, numbers.Integral) or num_tokens < 1:
            raise ValueError(f"num_tokens must be an integer >= 1, got {num_tokens!r}")

        def count(field: str) -> int:
            ratio = getattr(self, field)
            try:
                return num_kept(int(num_tokens), ratio)
            except ValueError as err:  # re-raise naming the recipe field
                raise ValueError(f"{field}={ratio} does not fit {num_tokens} tokens: {err}") from None

        return (
            count("m_t0") if self.has_clean else None,
            count("m_t") if self.has_noisy else None,
        )

    def validate_for(self, num_tokens: int) -> None:
        """Raise ValueError (naming m_t0 or m_t) if a used ratio keeps 0 of L tokens."""
        self.keep_counts(num_tokens)

    def check_num_clean(self, num_clean: int, batch_size: int) -> None:
        """Reject a clean-row count that contradicts r_t0 (ValueError naming it)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if (
            isinstance(num_clean, bool)
            or not isinstance(num_clean, numbers.Integral)
            or not 0 <= num_clean <= batch_size
        ):
            raise ValueError(f"num_clean must be an integer in [0, {batch_size}], got {num_clean!r}")
        # These two rules make the branch order recoverable from the recipe and the
        # number of branches alone (umd_loss relies on it).
        if self.r_t0 == 0 and num_clean != 0:
            raise ValueError(f"num_clean must be 0 when r_t0 = 0, got {num_clean}")
        if (self.r_t0 == 1) != (num_clean == batch_size):
            raise ValueError(
                f"num_clean must equal batch_size ({batch_size}) exactly when r_t0 = 1; "
                f"got num_clean={num_clean} with r_t0={self.r_t0}"
            )

    def branch_names(self, num_clean: int, batch_size: int) -> tuple[str, ...]:
        """Static names of the branches ``mix`` returns, in order.

        ``("clean", "noisy")``, or ``("clean", "full", "masked")`` under two-pass
        training, minus branches with no rows.
        """
        self.check_num_clean(num_clean, batch_size)
        names: tuple[str, ...] = ("clean",) if num_clean > 0 else ()
        if batch_size - num_clean > 0:
            names += ("full", "masked") if self.mdt_two_pass else ("noisy",)
        return names

    def branch_names_for_count(self, num_branches: int) -> tuple[str, ...]:
        """Recover the branch names from how many branches ``mix`` returned."""
        if self.mdt_two_pass:
            table = {1: ("clean",), 2: ("full", "masked"), 3: ("clean", "full", "masked")}
        else:
            table = {2: ("clean", "noisy"), 1: ("clean",) if self.r_t0 == 1 else ("noisy",)}
        if num_branches not in table:
            raise ValueError(
                f"recipe {self.name!r} yields {sorted(table)} branches, got {num_branches}"
            )
        names = table[num_branches]
        noisy = [n for n in names if n != "clean"]
        if ("clean" in names and not self.has_clean) or (noisy and not self.has_noisy):
            raise ValueError(f"recipe {self.name!r} cannot yield branches {names}")
        return names


def _check_fields(overrides: dict) -> None:
    valid = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown Recipe field(s) {unknown}; valid fields: {sorted(valid)}")


def _make(defaults: dict, overrides: dict) -> Recipe:
    _check_fields(overrides)
    return Recipe(**{**defaults, **overrides})


# -- presets --------------------------------------------------------------------------


def umd(**overrides) -> Recipe:
    """UMD pretraining (UMD paper Table 4): r_t0 0.5, m_t0 0.75, m_t 0.375, cosine, T 1000.

    For latents the paper uses the linear schedule: ``umd(schedule="linear")``.
    """
    return _make(dict(name="umd", r_t0=0.5, m_t0=0.75, m_t=0.375, schedule="cosine"), overrides)


def umd_finetune(**overrides) -> Recipe:
    """UMD generation finetuning (UMD paper Table 5): r_t0 0.05, m_t0 0.75, m_t 0,
    labels on with 10% label dropout, cosine (pixels), T 1000."""
    return _make(
        dict(name="umd_finetune", r_t0=0.05, m_t0=0.75, m_t=0.0, schedule="cosine", label_dropout=0.1),
        overrides,
    )


def mae(**overrides) -> Recipe:
    """MAE as the UMD special case r_t0 = 1, m_t0 = 0.75 (UMD paper Sec. 3 and Table 1).

    Only the clean branch exists: x0 MSE on hidden tokens. ``norm_pix_loss`` defaults
    to False because the UMD paper's MAE baseline is this special case of its own
    objective (Eq. 5: raw-pixel x0 targets; "we re-implement baseline methods in our
    codebase"), and that is the MAE its Table 1 compares against. Original MAE (He et
    al.) reports its best numbers with per-patch normalised targets:
    ``mae(norm_pix_loss=True)``.
    """
    return _make(dict(name="mae", r_t0=1.0, m_t0=0.75, m_t=0.0, schedule="cosine"), overrides)


def dit(**overrides) -> Recipe:
    """DiT as the UMD special case r_t0 = 0, m_t = 0 (UMD paper Sec. 3 and Table 1).

    Every row is noisy and unmasked, so the loss is 1/2 (eps MSE + x0 MSE) over all
    tokens: UMD's DiT baseline, which predicts both heads (the original DiT trains eps
    plus a learned-variance VLB term; sigma is not trained here). Cosine schedule as
    in the UMD pixel-space comparison; use ``dit(schedule="linear")`` for latents.
    Label dropout 0.1 as in DiT, so that a class-conditional run (``--class_conditional``)
    trains the null label classifier-free guidance needs; unconditional runs, such as
    the UMD paper's pretraining, have no labels to drop.
    """
    return _make(dict(name="dit", r_t0=0.0, m_t=0.0, schedule="cosine", label_dropout=0.1), overrides)


def maskdit(**overrides) -> Recipe:
    """MaskDiT as the UMD special case r_t0 = 0, m_t = 0.5 (UMD paper Sec. 3, Table 1):
    1/2 (eps MSE on visible + x0 MSE on hidden tokens), cosine schedule. Label dropout
    0.1 (DiT's) for class-conditional runs, as for ``dit``."""
    return _make(dict(name="maskdit", r_t0=0.0, m_t=0.5, schedule="cosine", label_dropout=0.1), overrides)


def mdt(**overrides) -> Recipe:
    """MDT training (Gao et al., MDT paper Sec. 3; REFERENCE sec. 3): r_t0 0, two
    passes per batch with the same t and independent noise, one full and one masked at
    m_t 0.3, eps MSE over all tokens for both, summed. Linear schedule (MDT works on
    SD-VAE latents). Label dropout 0.1 (DiT's, which MDT keeps) for class-conditional
    runs, so that its power-cosine guidance has a trained null label."""
    return _make(
        dict(name="mdt", r_t0=0.0, m_t=0.3, schedule="linear", noisy_loss="eps_all", mdt_two_pass=True,
             label_dropout=0.1),
        overrides,
    )


def usp(**overrides) -> Recipe:
    """USP pretraining (Chu et al., USP paper Sec. 3; REFERENCE sec. 4): MAE in VAE
    latent space, r_t0 1, m_t0 0.75, per-patch normalised x0 target on hidden tokens.
    The linear schedule is recorded for the DiT/SiT finetuning that follows (the
    pretraining itself uses no noise)."""
    return _make(
        dict(name="usp", r_t0=1.0, m_t0=0.75, m_t=0.0, schedule="linear", norm_pix_loss=True),
        overrides,
    )


PRESETS: dict[str, Callable[..., Recipe]] = {
    "umd": umd,
    "umd_finetune": umd_finetune,
    "mae": mae,
    "dit": dit,
    "maskdit": maskdit,
    "mdt": mdt,
    "usp": usp,
}


def get(name: str, **overrides) -> Recipe:
    """Look a preset up by name, e.g. from a command-line flag."""
    if name not in PRESETS:
        raise ValueError(f"unknown recipe {name!r}; valid names: {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
