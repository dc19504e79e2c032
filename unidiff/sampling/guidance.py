"""Classifier-free guidance around a model-agnostic denoiser, constant or power-cosine scale.

A denoiser is ``denoise_fn(x_t (B, ...), t (B,) int table index, labels (B,) int | None)
-> (x0_pred | None, eps_pred | None)``. ``guided`` returns a denoiser of the same
signature that runs the wrapped one ONCE on a doubled batch (conditional rows first, then
the same inputs with the null label) and combines

    out = uncond + w_t * (cond - uncond)

on every channel of every returned prediction (x0 and eps alike: REFERENCE §3 notes that
guiding only some channels is a bug in DiT/MDT/USP). Because the combination weights
(1 - w_t, w_t) sum to one and x0 <-> eps is affine for fixed (x_t, t), guiding the x0 head
and guiding the eps head give the same sampler update.

Scale schedules (t is the table index, 1..T noisy, T = schedule.num_steps):

* ``"constant"``: w_t = w.
* ``"power_cosine"`` (MDT): w_t = (w - 1) * (1 - cos(pi * (1 - k/T)^p)) / 2 + 1 with
  k = t - 1, the 0-based noisy index that MDT's code puts in this formula (its model's
  timestep), so the weight is 1 (to within (w - 1) * 5e-12 for T = 1000) at the noisiest
  step t = T and exactly w at the last model call t = 1; p = 4 and w = 3.8 in MDT. (The MDT
  paper writes w * (1 - cos(pi (t/t_max)^s)) / 2 with t counting sampling progress; the
  form above, from MDT's code, is what REFERENCE §3 specifies.) The clean step t = 0,
  which no sampler calls the model at, gets w as well.

Shape glossary: B batch; ``...`` the sample's trailing shape (H, W, C or tokens).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Tuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

DenoiseFn = Callable[
    [Float[Array, "b ..."], Int[Array, "b"], Optional[Int[Array, "b"]]],
    Tuple[Optional[Float[Array, "b ..."]], Optional[Float[Array, "b ..."]]],
]

GUIDANCE_SCHEDULES = ("constant", "power_cosine")


def _validate(scale: float, schedule_kind: str, power: float) -> None:
    try:
        ok = math.isfinite(float(scale)) and float(scale) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"guidance scale must be a finite number >= 0, got {scale!r}")
    if schedule_kind not in GUIDANCE_SCHEDULES:
        raise ValueError(
            f"guidance schedule must be one of {GUIDANCE_SCHEDULES}, got {schedule_kind!r}"
        )
    try:
        ok = float(power) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"guidance power must be > 0, got {power!r}")


@dataclasses.dataclass(frozen=True)
class GuidanceSpec:
    """Classifier-free guidance settings for the samplers.

    ``null_label`` is the model's null class (``num_classes`` in unidiff models).
    """

    scale: float
    null_label: int
    schedule: str = "constant"
    power: float = 4.0

    def __post_init__(self):
        _validate(self.scale, self.schedule, self.power)
        if not isinstance(self.null_label, (int, np.integer)) or self.null_label < 0:
            raise ValueError(f"null_label must be an int >= 0, got {self.null_label!r}")

    def wrap(self, denoise_fn: DenoiseFn, num_steps: int) -> DenoiseFn:
        return guided(
            denoise_fn,
            null_label=self.null_label,
            scale=self.scale,
            schedule_kind=self.schedule,
            power=self.power,
            num_steps=num_steps,
        )


def guidance_weight(
    t: Int[Array, "b"],
    scale: float,
    schedule_kind: str = "constant",
    power: float = 4.0,
    num_steps: int = 1000,
) -> Float[Array, "b"]:
    """w_t per example for table indices ``t`` (see the module docstring)."""
    _validate(scale, schedule_kind, power)
    t = jnp.asarray(t)
    if schedule_kind == "constant":
        return jnp.full(t.shape, scale, jnp.float32)
    k = jnp.maximum(t.astype(jnp.float32) - 1.0, 0.0)  # MDT's 0-based timestep
    frac = 1.0 - k / num_steps
    ramp = (1.0 - jnp.cos(jnp.pi * frac**power)) / 2.0
    return (scale - 1.0) * ramp + 1.0


def guided(
    denoise_fn: DenoiseFn,
    *,
    null_label: int,
    scale: float,
    schedule_kind: str = "constant",
    power: float = 4.0,
    num_steps: int,
) -> DenoiseFn:
    """Wrap ``denoise_fn`` with classifier-free guidance (one call on a 2B batch)."""
    _validate(scale, schedule_kind, power)

    def fn(x_t, t, labels):
        if labels is None:
            raise ValueError("classifier-free guidance needs labels (B,), got None")
        b = x_t.shape[0]
        if labels.shape != (b,):
            raise ValueError(f"labels must have shape ({b},), got {labels.shape}")
        null = jnp.full_like(labels, null_label)
        x0, eps = denoise_fn(
            jnp.concatenate([x_t, x_t]),
            jnp.concatenate([t, t]),
            jnp.concatenate([labels, null]),
        )
        w = guidance_weight(t, scale, schedule_kind, power, num_steps)

        def combine(pred):
            if pred is None:
                return None
            cond, uncond = pred[:b], pred[b:]
            wb = w.astype(pred.dtype).reshape((b,) + (1,) * (pred.ndim - 1))
            return uncond + wb * (cond - uncond)

        return combine(x0), combine(eps)

    return fn
