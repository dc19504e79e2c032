"""Diffusion noise schedules with an extra clean step, and the forward process.

Tables have T + 1 entries. Index 0 is the clean step (beta 0, alpha_bar 1), so
``q_sample`` at t = 0 returns x0 unchanged and the clean branch of UMD is just t = 0.
Indices 1..T are the usual noisy steps. ``t`` arguments are integer table indices.

Shape glossary: B batch; ``...`` any trailing shape (tokens, pixels).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

SCHEDULE_KINDS = ("cosine", "linear")


class Schedule(NamedTuple):
    """A pytree of (T + 1,) float32 tables; index 0 is the clean step."""

    betas: Float[Array, "t1"]
    alphas_cumprod: Float[Array, "t1"]

    @property
    def num_steps(self) -> int:
        """T, the number of noisy steps."""
        return self.betas.shape[0] - 1


def _cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    # Nichol & Dhariwal: alpha_bar(t) = f(t) / f(0), betas from ratios, clipped.
    t = np.arange(num_steps + 1, dtype=np.float64)
    f = np.cos(((t / num_steps + s) / (1 + s)) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def _linear_betas(
    num_steps: int, start: float = 1e-4, end: float = 0.02, max_beta: float = 0.999
) -> np.ndarray:
    # DDPM's endpoints are for T = 1000. Scaled by 1000 / T (as improved DDPM does), the
    # betas sum to about 10 for any T, so alpha_bar_T stays near 4e-5 and x_T is noise;
    # unscaled, T = 50 would end at alpha_bar_T = 0.6. Clipped like the cosine betas,
    # since below T = 50 the scaled end passes 1.
    scale = 1000.0 / num_steps
    return np.minimum(np.linspace(scale * start, scale * end, num_steps, dtype=np.float64),
                      max_beta)


def make_schedule(kind: str = "cosine", num_steps: int = 1000) -> Schedule:
    """Build a schedule: ``"cosine"`` (pixels) or ``"linear"`` (latents).

    ``"linear"`` is DDPM's linspace(1e-4, 0.02, T) at T = 1000 and the same line scaled
    by 1000 / T otherwise (betas clipped at 0.999), so every T ends near pure noise.
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {SCHEDULE_KINDS}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    noisy = _cosine_betas(num_steps) if kind == "cosine" else _linear_betas(num_steps)
    betas = np.concatenate([[0.0], noisy])
    alphas_cumprod = np.cumprod(1.0 - betas)
    return Schedule(
        betas=jnp.asarray(betas, jnp.float32),
        alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
    )


def _coefficients(
    schedule: Schedule, t: Int[Array, "b"], like: Array
) -> tuple[Array, Array]:
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) reshaped to broadcast against ``like``
    (B, ...) and in its dtype. Both are computed in float32 and only then cast: in
    bfloat16, alpha_bar_t rounds to 1.0 for the first ~20 noisy steps of the cosine
    schedule, which would make sqrt(1 - alpha_bar_t) exactly 0 (no noise at all)."""
    if not jnp.issubdtype(jnp.result_type(like), jnp.floating):
        raise ValueError(f"x must be floating point, got {jnp.result_type(like)}: the "
                         "coefficients cast to it would be rounded to 0 or 1")
    num_steps = schedule.num_steps
    if isinstance(t, (int, np.integer, np.ndarray)) and not isinstance(t, bool):
        # A host value is checked here at no cost (a device array would need a sync).
        host = np.asarray(t)
        if host.dtype.kind in "iu" and host.size and (host.min() < 0 or host.max() > num_steps):
            raise ValueError(f"t must be table indices in 0..T = 0..{num_steps}, got values "
                             f"{host.min()}..{host.max()}")
    t = jnp.asarray(t)  # a Python int is the documented scalar form; it has no .shape
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"t must hold integer table indices, got dtype {t.dtype}")
    if jnp.ndim(t) > 1 or (jnp.ndim(t) == 1 and jnp.shape(t)[0] != jnp.shape(like)[0]):
        # A (B,) t pairs with x's rows; broadcasting a (1,) t or x would silently reuse one.
        raise ValueError(f"t must have shape (B,) = ({jnp.shape(like)[0]},) for x of shape "
                         f"{jnp.shape(like)}, or be a scalar; got {jnp.shape(t)}")
    # Outside 0..T, jnp.take would wrap a negative t to the far end of the table (t = -1
    # read as t = T) and give NaN past T; NaN for both, so a traced bad t cannot pass as a
    # plausible one (the train step's non-finite guard then skips the step).
    inside = (t >= 0) & (t <= num_steps)
    a = jnp.where(inside, jnp.take(schedule.alphas_cumprod, jnp.clip(t, 0, num_steps)),
                  jnp.nan).astype(jnp.float32)
    shape = t.shape + (1,) * (like.ndim - t.ndim)
    return (jnp.sqrt(a).astype(like.dtype).reshape(shape),
            jnp.sqrt(1.0 - a).astype(like.dtype).reshape(shape))


def _same_shape(a: Array, b: Array, name_a: str, name_b: str) -> None:
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(f"{name_b} must have the shape of {name_a}, {jnp.shape(a)}; got "
                         f"{jnp.shape(b)} (no broadcasting: one row reused for all is a bug)")


def q_sample(
    schedule: Schedule, x0: Float[Array, "b ..."], t: Int[Array, "b"], noise: Float[Array, "b ..."]
) -> Float[Array, "b ..."]:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
    _same_shape(x0, noise, "x0", "noise")
    sqrt_a, sigma = _coefficients(schedule, t, x0)
    return sqrt_a * x0 + sigma * noise


def x0_from_eps(
    schedule: Schedule, xt: Float[Array, "b ..."], t: Int[Array, "b"], eps: Float[Array, "b ..."]
) -> Float[Array, "b ..."]:
    """Invert q_sample for x0 given the noise. Exact (x0 = x_t) at t = 0."""
    _same_shape(xt, eps, "xt", "eps")
    sqrt_a, sigma = _coefficients(schedule, t, xt)
    return (xt - sigma * eps) / sqrt_a


def eps_from_x0(
    schedule: Schedule, xt: Float[Array, "b ..."], t: Int[Array, "b"], x0: Float[Array, "b ..."]
) -> Float[Array, "b ..."]:
    """Invert q_sample for the noise given x0. At t = 0 there is no noise: returns 0."""
    _same_shape(xt, x0, "xt", "x0")
    sqrt_a, sigma = _coefficients(schedule, t, xt)
    safe = jnp.where(sigma > 0, sigma, jnp.ones_like(sigma))
    return jnp.where(sigma > 0, (xt - sqrt_a * x0) / safe, jnp.zeros_like(xt))
