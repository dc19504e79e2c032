"""DDIM (respaced, any eta) and DDPM ancestral samplers, independent of any model.

The sampler talks to the model only through a denoiser
``denoise_fn(x_t (B, ...), t (B,) int32 table index, labels (B,) | None)
-> (x0_pred | None, eps_pred | None)``. ``head`` picks which prediction drives sampling;
the other is derived from it with the schedule (so a model may return None for the one not
used). With ``clip_x0`` (pixel space only; turn it off for latents) x0 is clipped to
[-1, 1] and eps is recomputed from the clipped x0, so the update stays consistent.

Time indices are TABLE indices of ``unidiff.corruption.schedule``: 0 is the clean step
(alpha_bar = 1), 1..T are the noisy steps. The reference code's 0-based noisy index k is
t = k + 1.

DDIM respacing (REFERENCE §5): stride = T // steps; model calls at
k = T-1, T-1-stride, ... (down to the last value >= 0), then a final call at k = 0 unless
the strided list already ended there. For T = 1000, steps = 125: k = 999, 991, ..., 7, 0,
i.e. t = 1000, 992, ..., 8, 1: 126 model calls and 125 DDIM updates between consecutive
values; the x0 prediction of the last call (t = 1) is the sample. Here that last x0 step
is written as one more DDIM update to the clean step t = 0 (alpha_bar = 1, sigma = 0),
which returns exactly the (clipped) x0 prediction, so every model call sits in one
``lax.scan`` body and the denoiser is traced once.

DDPM: ancestral sampling over all T steps with the posterior q(x_{t-1} | x_t, x0) mean and
the CORRECT variance beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
(REFERENCE §8: the reference code's variance formula is wrong). At t = 1 the variance is 0
and the mean is x0, so the last step returns the x0 prediction. DDIM with eta = 1 and
steps = T is the same chain (same key use), which the tests check.

Both samplers are pure and traceable: wrap them in ``jax.jit`` with the model parameters
as an argument so a checkpoint's weights are not baked into the program, e.g.::

    @jax.jit
    def sample(params, key, labels):
        fn = lambda x, t, y: model_fn(params, x, t, y)
        return ddim_sample(fn, schedule, key, (labels.shape[0], 64, 64, 3), labels,
                           steps=125, eta=1.0, guidance=GuidanceSpec(1.5, null_label=1000))

Results are deterministic given the key; one key draws x_T and one key per update.

Shape glossary: B batch; ``...`` the sample's trailing shape (H, W, C for pixels).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from unidiff.corruption.schedule import Schedule, eps_from_x0, x0_from_eps
from unidiff.sampling.guidance import DenoiseFn, GuidanceSpec

HEADS = ("eps", "x0")


def ddim_timesteps(num_steps: int, steps: int) -> Int[np.ndarray, "n"]:
    """Descending table indices of the DDIM model calls (see the module docstring).

    Example: ``ddim_timesteps(1000, 125)`` = [1000, 992, ..., 8, 1] (126 entries).
    """
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps (T) must be an integer >= 1, got {num_steps!r}")
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= num_steps:
        raise ValueError(f"steps must be an integer in [1, T = {num_steps}], got {steps!r}")
    stride = num_steps // steps
    k = np.arange(num_steps - 1, -1, -stride)
    if k[-1] != 0:
        k = np.append(k, 0)
    return (k + 1).astype(np.int32)


def posterior_variance(schedule: Schedule) -> Float[Array, "t1"]:
    """beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t); entry 0 is 0."""
    abar = schedule.alphas_cumprod
    abar_prev = jnp.concatenate([jnp.ones((1,), abar.dtype), abar[:-1]])
    safe = jnp.where(abar < 1.0, 1.0 - abar, 1.0)
    return jnp.where(abar < 1.0, schedule.betas * (1.0 - abar_prev) / safe, 0.0)


def _check_common(head: str, shape: Sequence[int], labels, eta: float = 0.0) -> None:
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if len(shape) < 1 or any(int(s) < 1 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive ints (B, ...), got {shape!r}")
    if labels is not None and tuple(jnp.shape(labels)) != (shape[0],):
        raise ValueError(f"labels must have shape ({shape[0]},), got {tuple(jnp.shape(labels))}")
    try:
        ok = 0.0 <= float(eta) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        # Above 1, sigma_t^2 can pass 1 - alpha_bar_s: the update has no direction term left
        # to give back and the samples come out too wide (DDIM's eta is in [0, 1]).
        raise ValueError(f"eta must be a Python number in [0, 1] (static), got {eta!r}")


def _prepare(denoise_fn, schedule, guidance: Optional[GuidanceSpec], labels):
    if labels is not None:
        labels = jnp.asarray(labels, jnp.int32)
    if guidance is None:
        return denoise_fn, labels
    if labels is None:
        raise ValueError("guidance needs labels (B,); got labels=None")
    return guidance.wrap(denoise_fn, schedule.num_steps), labels


def predict_x0_eps(
    denoise_fn: DenoiseFn,
    schedule: Schedule,
    x_t: Float[Array, "b ..."],
    t: Int[Array, "b"],
    labels: Optional[Int[Array, "b"]],
    head: str = "eps",
    clip_x0: bool = True,
) -> tuple[Float[Array, "b ..."], Float[Array, "b ..."]]:
    """Call the denoiser and return a consistent (x0, eps) pair from the chosen head."""
    x0, eps = denoise_fn(x_t, t, labels)
    if head == "eps":
        if eps is None:
            raise ValueError("head='eps' but the denoiser returned eps_pred=None")
        eps = eps.astype(x_t.dtype)
        x0 = x0_from_eps(schedule, x_t, t, eps)
    else:
        if x0 is None:
            raise ValueError("head='x0' but the denoiser returned x0_pred=None")
        x0 = x0.astype(x_t.dtype)
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
    if clip_x0 or head == "x0":
        eps = eps_from_x0(schedule, x_t, t, x0)
    return x0, eps


def ddim_sample(
    denoise_fn: DenoiseFn,
    schedule: Schedule,
    key: PRNGKeyArray,
    shape: Sequence[int],
    labels: Optional[Int[Array, "b"]] = None,
    *,
    steps: int = 125,
    eta: float = 0.0,
    head: str = "eps",
    guidance: Optional[GuidanceSpec] = None,
    clip_x0: bool = True,
) -> Float[Array, "b ..."]:
    """DDIM from x_T ~ N(0, I) of ``shape`` (B, ...); returns the final x0 (float32).

    ``eta`` = 0 is deterministic DDIM, 1 the UMD finetune setting (ancestral-like noise).
    """
    _check_common(head, shape, labels, eta)
    shape = tuple(int(s) for s in shape)
    fn, labels = _prepare(denoise_fn, schedule, guidance, labels)
    calls = ddim_timesteps(schedule.num_steps, steps)
    t_cur = jnp.asarray(calls)
    t_next = jnp.asarray(np.append(calls[1:], 0).astype(np.int32))
    key_init, key_steps = jax.random.split(key)
    step_keys = jax.random.split(key_steps, calls.shape[0])
    abar = schedule.alphas_cumprod
    stochastic = float(eta) != 0.0  # static: skip drawing noise for deterministic DDIM
    b = shape[0]

    def body(x, inp):
        tc, tn, k = inp
        x0, eps = predict_x0_eps(fn, schedule, x, jnp.full((b,), tc, jnp.int32), labels, head, clip_x0)
        a_t, a_s = abar[tc], abar[tn]
        var = (float(eta) ** 2) * (1.0 - a_s) / (1.0 - a_t) * jnp.maximum(1.0 - a_t / a_s, 0.0)
        direction = jnp.sqrt(jnp.maximum(1.0 - a_s - var, 0.0))
        x_next = jnp.sqrt(a_s) * x0 + direction * eps
        if stochastic:
            x_next = x_next + jnp.sqrt(var) * jax.random.normal(k, shape, x.dtype)
        return x_next, None

    x_T = jax.random.normal(key_init, shape, jnp.float32)
    x, _ = jax.lax.scan(body, x_T, (t_cur, t_next, step_keys))
    return x


def ddpm_sample(
    denoise_fn: DenoiseFn,
    schedule: Schedule,
    key: PRNGKeyArray,
    shape: Sequence[int],
    labels: Optional[Int[Array, "b"]] = None,
    *,
    head: str = "eps",
    guidance: Optional[GuidanceSpec] = None,
    clip_x0: bool = True,
) -> Float[Array, "b ..."]:
    """Ancestral DDPM over all T steps with the correct posterior variance; returns x0."""
    _check_common(head, shape, labels)
    shape = tuple(int(s) for s in shape)
    fn, labels = _prepare(denoise_fn, schedule, guidance, labels)
    num_steps = schedule.num_steps
    ts = jnp.arange(num_steps, 0, -1, dtype=jnp.int32)
    key_init, key_steps = jax.random.split(key)
    step_keys = jax.random.split(key_steps, num_steps)
    abar = schedule.alphas_cumprod
    post_var = posterior_variance(schedule)
    b = shape[0]

    def body(x, inp):
        t, k = inp
        x0, _ = predict_x0_eps(fn, schedule, x, jnp.full((b,), t, jnp.int32), labels, head, clip_x0)
        a_t, a_prev = abar[t], abar[t - 1]
        # beta_t as 1 - alpha_bar_t / alpha_bar_{t-1}, not the separately rounded float32
        # betas table: at t = 1 (alpha_bar_0 = 1) this makes coef_x0 exactly 1 and coef_xt
        # exactly 0, so the last step returns the x0 prediction, not 0.9995 of it.
        alpha = a_t / a_prev
        coef_x0 = jnp.sqrt(a_prev) * (1.0 - alpha) / (1.0 - a_t)
        coef_xt = jnp.sqrt(alpha) * (1.0 - a_prev) / (1.0 - a_t)
        mean = coef_x0 * x0 + coef_xt * x
        return mean + jnp.sqrt(post_var[t]) * jax.random.normal(k, shape, x.dtype), None

    x_T = jax.random.normal(key_init, shape, jnp.float32)
    x, _ = jax.lax.scan(body, x_T, (ts, step_keys))
    return x
