"""The UMD loss (UMD paper Eq. 4-6; REFERENCE sec. 1) and its special cases.

Per branch, with masked means taken over the selected tokens and all P values of
each token:

* clean branch (t = 0): x0 MSE over hidden tokens only (Eq. 5, exactly MAE);
* noisy branch, ``noisy_loss="eps_x0"``: 1/2 (eps MSE over visible tokens + x0 MSE
  over hidden tokens) (Eq. 4); without a mask both terms are over all tokens, which
  is the DiT special case 1/2 (eps MSE + x0 MSE);
* noisy branch, ``noisy_loss="eps_all"``: eps MSE over all tokens (MDT); under
  two-pass training the full and the masked pass are summed.

Total = (1 - n0/B) * noisy + (n0/B) * clean (Eq. 6 with r_t0 realised as the batch
fraction n0/B of clean rows). With ``norm_pix_loss`` every x0 target patch is
normalised by its own mean and variance first (MAE's ``norm_pix_loss``).

The mask weights multiply the squared errors (no ``where``), so gradients are exactly
zero on tokens a term does not cover, and the denominators are static counts (every
row keeps the same K tokens).

Shape glossary: B_i rows of one branch, L tokens, P values per token, K visible.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float

from unidiff.corruption.masking import Masking
from unidiff.corruption.mixing import Branch
from unidiff.corruption.recipes import Recipe
from unidiff.corruption.schedule import Schedule, eps_from_x0, x0_from_eps

NORM_PIX_EPS = 1e-6


class Prediction(NamedTuple):
    """What a model returns for one branch: x0 and eps heads (either may be None)
    and an optional learned variance, which the UMD loss does not train."""

    x0: Float[Array, "bi l p"] | None
    eps: Float[Array, "bi l p"] | None
    sigma: Float[Array, "bi l p"] | None = None


def normalize_patches(
    x: Float[Array, "*b p"], eps: float = NORM_PIX_EPS, ddof: int = 1
) -> Float[Array, "*b p"]:
    """Per-patch target normalisation: (x - mean) / sqrt(var + eps) over the last axis.

    As in MAE's ``norm_pix_loss`` (which USP adopts): the variance is the unbiased one
    (``ddof=1``, what ``torch.Tensor.var`` computes by default) and eps = 1e-6.
    """
    p = x.shape[-1]
    if p <= ddof:
        raise ValueError(f"normalize_patches needs more than ddof={ddof} values per patch, got P={p}")
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True, ddof=ddof)
    return (x - mean) / jnp.sqrt(var + eps)


def _masked_mean(
    sq: Float[Array, "bi l p"], masking: Masking | None, which: str
) -> Float[Array, ""]:
    """Mean of ``sq`` over the ``which`` ("visible" / "hidden" / "all") tokens."""
    if masking is None or which == "all":
        return jnp.mean(sq)
    b, l, p = sq.shape
    k = masking.ids_keep.shape[1]
    if which == "hidden":
        weight, count = masking.mask, l - k
    else:
        weight, count = 1.0 - masking.mask, k
    if count == 0:  # float rounding can make a tiny ratio hide nothing: an empty mean
        return jnp.zeros((), sq.dtype)
    return jnp.sum(sq * weight[..., None].astype(sq.dtype)) / (b * count * p)


def _sq(pred: Array, target: Array) -> Array:
    return jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))


def _x0_target(recipe: Recipe, branch: Branch) -> Array:
    x0 = branch.x0.astype(jnp.float32)
    return normalize_patches(x0) if recipe.norm_pix_loss else x0


def _check_shapes(name: str, branch: Branch, pred: Prediction) -> None:
    if not isinstance(pred, Prediction):
        raise ValueError(f"preds for branch {name!r} must be a Prediction, got {type(pred).__name__}")
    if pred.x0 is None and pred.eps is None:
        raise ValueError(f"prediction for branch {name!r} has neither x0 nor eps")
    for head in ("x0", "eps"):
        val = getattr(pred, head)
        if val is not None and val.shape != branch.x0.shape:
            raise ValueError(
                f"prediction {head} for branch {name!r} has shape {val.shape}, expected "
                f"{branch.x0.shape}"
            )


def _clean_loss(recipe: Recipe, branch: Branch, pred: Prediction) -> Array:
    if pred.x0 is None:
        raise ValueError("the clean branch needs an x0 prediction (Prediction.x0 is None)")
    return _masked_mean(_sq(pred.x0, _x0_target(recipe, branch)), branch.masking, "hidden")


def _noisy_terms(
    recipe: Recipe, schedule: Schedule, branch: Branch, pred: Prediction
) -> dict[str, Array]:
    """The terms of one noisy pass: {"loss", "eps_loss"} (+ "x0_loss" for eps_x0)."""
    eps_pred = pred.eps
    if eps_pred is None:
        if recipe.norm_pix_loss:
            raise ValueError(
                "norm_pix_loss needs an eps prediction head on noisy branches: an eps derived "
                "from the x0 head would come from per-patch normalised targets, not x0"
            )
        eps_pred = eps_from_x0(schedule, branch.x_t, branch.t, pred.x0)
    if recipe.noisy_loss == "eps_all":
        eps_loss = _masked_mean(_sq(eps_pred, branch.eps), branch.masking, "all")
        return {"loss": eps_loss, "eps_loss": eps_loss}
    x0_pred = pred.x0
    if x0_pred is None:
        if recipe.norm_pix_loss:
            raise ValueError(
                "norm_pix_loss needs an x0 prediction head: an x0 derived from eps is in "
                "raw target space, not per-patch normalised"
            )
        x0_pred = x0_from_eps(schedule, branch.x_t, branch.t, eps_pred)
    eps_loss = _masked_mean(_sq(eps_pred, branch.eps), branch.masking, "visible")
    x0_loss = _masked_mean(_sq(x0_pred, _x0_target(recipe, branch)), branch.masking, "hidden")
    return {"loss": 0.5 * (eps_loss + x0_loss), "eps_loss": eps_loss, "x0_loss": x0_loss}


def umd_loss(
    recipe: Recipe,
    schedule: Schedule,
    branches: tuple[Branch, ...],
    preds: tuple[Prediction, ...],
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """The UMD objective for the branches ``mix`` built and the model's predictions.

    Args:
      recipe: the recipe ``mix`` was called with (static).
      schedule: the same schedule; used to derive a missing x0 (``x0_from_eps``) or
        eps (``eps_from_x0``) head.
      branches: ``mix``'s output, in ``recipe.branch_names`` order.
      preds: one :class:`Prediction` per branch, same order.

    Returns:
      ``(loss, metrics)``: float32 scalars. Metric keys depend only on the recipe:
      ``"loss"``; ``"loss_clean"`` if r_t0 > 0; if r_t0 < 1 ``"loss_noisy"``,
      ``"eps_loss"`` and, for ``noisy_loss="eps_x0"``, ``"x0_loss"`` (the unweighted
      noisy-branch terms; summed over the two passes under two-pass training, which
      also adds ``"loss_full"`` and ``"loss_masked"``). A branch with no rows in this
      batch reports 0.
    """
    branches, preds = tuple(branches), tuple(preds)
    if len(preds) != len(branches):
        raise ValueError(f"got {len(preds)} preds for {len(branches)} branches")
    names = recipe.branch_names_for_count(len(branches))
    by_name = {}
    for name, branch, pred in zip(names, branches, preds):
        _check_shapes(name, branch, pred)
        by_name[name] = (branch, pred)

    zero = jnp.zeros((), jnp.float32)
    n_clean = by_name["clean"][0].x0.shape[0] if "clean" in by_name else 0
    noisy_names = [n for n in names if n != "clean"]
    n_noisy = by_name[noisy_names[0]][0].x0.shape[0] if noisy_names else 0
    for n in noisy_names:
        if by_name[n][0].x0.shape[0] != n_noisy:
            raise ValueError(f"branches {noisy_names} must have the same number of rows")
    total_rows = n_clean + n_noisy

    metrics: dict[str, Array] = {}
    total = zero
    if recipe.has_clean:
        clean = _clean_loss(recipe, *by_name["clean"]) if n_clean else zero
        metrics["loss_clean"] = clean
        total = total + (n_clean / total_rows) * clean
    if recipe.has_noisy:
        keys = ("loss", "eps_loss") + (("x0_loss",) if recipe.noisy_loss == "eps_x0" else ())
        summed = {k: zero for k in keys}
        for n in noisy_names:
            terms = _noisy_terms(recipe, schedule, *by_name[n])
            summed = {k: summed[k] + terms[k] for k in keys}
            if recipe.mdt_two_pass:
                metrics[f"loss_{n}"] = terms["loss"]
        if recipe.mdt_two_pass:
            for n in ("full", "masked"):
                metrics.setdefault(f"loss_{n}", zero)
        metrics["loss_noisy"] = summed["loss"]
        metrics["eps_loss"] = summed["eps_loss"]
        if "x0_loss" in summed:
            metrics["x0_loss"] = summed["x0_loss"]
        total = total + (n_noisy / total_rows) * summed["loss"]
    metrics["loss"] = total
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in sorted(metrics.items())}
    return metrics["loss"], metrics
