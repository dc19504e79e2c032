"""The UMD mixing step: split a batch into a clean branch and a noisy branch.

Following the authors' code (REFERENCE sec. 1), the split is deterministic: the first
``n_clean = int(B * r_t0)`` rows take the clean step (t = 0, no noise, masked at m_t0),
the rest a noisy step (t uniform on 1..T, x_t = q_sample(x0, t, eps), masked at m_t).
Each branch has its own static keep count, so every shape is static and the model runs
once per branch with no padding.

Randomness is per example: ``keys`` holds one key per row and every draw for row i
(its t, its noise, its mask) comes from ``keys[i]`` alone. The result for a row then
depends only on its key, its data and its branch, not on the batch it sits in, so a
batch sharded over devices (each device mixing its own rows, with its share of clean
rows, see :func:`split_batch`) draws exactly what the unsharded batch draws.

Each row makes ONE call to the key's bit generator, for a fixed layout of 32-bit words
(``[t | L mask words | L*P noise words | L*P second-pass noise words]``), and every
quantity is derived from its slice of those words. Separate ``split`` / ``randint`` /
``normal`` / ``uniform`` calls per row draw the same distributions, but each inlines
its own copy of the hash, which made ``mix`` several times slower to compile.

Shape glossary: B batch, B_i rows of one branch, L tokens, P values per token,
K visible tokens.
"""

from __future__ import annotations

import numbers
from fractions import Fraction
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, PRNGKeyArray, UInt

from unidiff.corruption.masking import Masking, num_kept
from unidiff.corruption.recipes import Recipe
from unidiff.corruption.schedule import Schedule, q_sample


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def split_batch(batch_size: int, r_t0: float, num_devices: int = 1) -> tuple[int, int]:
    """(n_clean, n_noisy) for a global batch, equal on every device.

    n_clean = floor(B * r_t0) rounded down to a multiple of ``num_devices`` = D, so
    each device gets n_clean / D clean rows and (B - n_clean) / D noisy rows.

    Consistency with a per-device split: floor(floor(B r) / D) * D equals
    D * split_batch(B / D, r)[0], because floor(floor(x) / D) = floor(x / D) for an
    integer D. To make that hold exactly (not just up to float rounding), r_t0 is read
    as the decimal it prints as (``Fraction(repr(r_t0))``) and the product is exact:
    ``split_batch(100, 0.29)`` is 29 clean rows, not the 28 that
    ``int(100 * 0.29)`` gives in binary floating point.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    num_devices = _check_int("num_devices", num_devices, 1)
    if isinstance(r_t0, bool) or not isinstance(r_t0, numbers.Real) or not 0.0 <= r_t0 <= 1.0:
        raise ValueError(f"r_t0 must be a real number in [0, 1], got {r_t0!r}")
    if batch_size % num_devices:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by num_devices={num_devices}; every "
            "device needs the same number of rows"
        )
    exact = Fraction(repr(float(r_t0))) * batch_size
    n_clean = (int(exact) // num_devices) * num_devices  # int() of a Fraction floors (>= 0)
    return n_clean, batch_size - n_clean


class Branch(NamedTuple):
    """One model call's worth of corrupted inputs and targets (a pytree).

    ``x_t`` (B_i, L, P) model input (= x0 on the clean branch); ``t`` (B_i,) int32
    table index (0 on the clean branch); ``x0`` (B_i, L, P) clean target; ``eps``
    (B_i, L, P) the noise that was added (zeros at t = 0); ``masking`` a
    :class:`Masking` or None when the branch's ratio is 0; ``labels`` (B_i,) or None.
    """

    x_t: Float[Array, "bi l p"]
    t: Int[Array, "bi"]
    x0: Float[Array, "bi l p"]
    eps: Float[Array, "bi l p"]
    masking: Masking | None
    labels: Int[Array, "bi"] | None


def masking_from_noise(noise: Array, mask_ratio: float) -> Masking:
    """MAE masking from given per-row noise (B, L): argsort, keep the first K.

    The same construction as :func:`unidiff.corruption.masking.random_masking`, which
    is this function applied to ``jax.random.uniform(key, (B, L))``; any real or
    unsigned-integer noise with no ties gives a uniformly random K-subset per row.
    """
    b, l = noise.shape
    k = num_kept(l, mask_ratio)
    ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
    ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
    hidden_in_shuffle_order = (jnp.arange(l) >= k).astype(jnp.float32)
    mask = jnp.take_along_axis(jnp.broadcast_to(hidden_in_shuffle_order, (b, l)), ids_restore, axis=1)
    return Masking(ids_keep=ids_shuffle[:, :k], ids_restore=ids_restore, mask=mask)


def normal_from_bits(bits: UInt[Array, "..."], dtype=jnp.float32) -> Float[Array, "..."]:
    """Standard normal samples from uniform 32-bit words, one per word.

    The construction of ``jax.random.normal``: 23 random mantissa bits give a uniform
    value on a grid symmetric about 0 inside the open interval (-1, 1) (so erfinv stays
    finite), then sqrt(2) * erfinv.
    """
    u = lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0
    v = (u + 2.0**-24) * 2.0 - 1.0  # exact in float32; in [-1 + 2^-23, 1 - 2^-23]
    return (jnp.sqrt(2.0) * lax.erf_inv(v)).astype(dtype)


def _row_words(keys: PRNGKeyArray, num_words: int) -> UInt[Array, "b w"]:
    return jax.vmap(lambda k: jax.random.bits(k, (num_words,), jnp.uint32))(keys)


def mix(
    recipe: Recipe,
    schedule: Schedule,
    keys: PRNGKeyArray,
    x0: Float[Array, "b l p"],
    labels: Int[Array, "b"] | None = None,
    num_clean: int | None = None,
) -> tuple[Branch, ...]:
    """Build the branches of one UMD training step, in ``recipe.branch_names`` order.

    Args:
      recipe: static (hashable) recipe.
      schedule: the diffusion tables (from ``make_schedule(recipe.schedule,
        recipe.num_steps)``).
      keys: (B,) typed key array, one key per example (``jax.random.split(key, B)``);
        legacy uint32 keys of shape (B, 2) also work.
      x0: (B, L, P) clean patch tokens.
      labels: (B,) class labels or None; passed through unchanged (the train step
        decides about null labels and label dropout).
      num_clean: static number of clean rows; default ``split_batch(B, r_t0)[0]``.
        Under data parallelism pass the per-device share. Must be 0 when r_t0 = 0,
        and equals B exactly when r_t0 = 1.

    Returns:
      ``(clean, noisy)`` Branches (``(clean, full, masked)`` for MDT two-pass), with
      branches that have no rows left out. Clean rows are ``[0, num_clean)``.
    """
    if x0.ndim != 3:
        raise ValueError(f"x0 must have shape (B, L, P), got {x0.shape}")
    if not jnp.issubdtype(x0.dtype, jnp.floating):
        raise ValueError(f"x0 must be floating point (images scaled to [-1, 1], or latents), "
                         f"got {x0.dtype}: noise cast to it would be rounded away")
    batch_size, num_tokens, _ = x0.shape
    typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    if keys.shape[:1] != (batch_size,) or keys.ndim != (1 if typed else 2):
        raise ValueError(
            f"keys must hold one key per example, shape ({batch_size},) typed keys, got "
            f"{keys.shape} {keys.dtype}"
        )
    if labels is not None and labels.shape != (batch_size,):
        raise ValueError(f"labels must have shape ({batch_size},), got {labels.shape}")
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    if schedule.num_steps != recipe.num_steps:
        # t would be drawn on 1..schedule's T, silently ignoring the recipe's num_steps.
        raise ValueError(
            f"schedule has T={schedule.num_steps} steps but the recipe's num_steps is "
            f"{recipe.num_steps}; build it with make_schedule(recipe.schedule, recipe.num_steps)"
        )
    if num_clean is None:
        num_clean = split_batch(batch_size, recipe.r_t0)[0]
    names = recipe.branch_names(num_clean, batch_size)
    recipe.validate_for(num_tokens)

    values = x0.shape[1] * x0.shape[2]
    num_noises = 2 if recipe.mdt_two_pass else 1
    # Word layout per row: [0] t, [1, 1+L) mask noise, then one block of L*P words per
    # noise draw. Every row draws the full layout so that a row's words never depend
    # on which branch it lands in.
    words = _row_words(keys, 1 + num_tokens + num_noises * values)
    mask_words = words[:, 1 : 1 + num_tokens]

    def noise(lo: int, hi: int, draw: int) -> Array:
        start = 1 + num_tokens + draw * values
        return normal_from_bits(words[lo:hi, start : start + values], x0.dtype).reshape(x0[lo:hi].shape)

    def masking(lo: int, hi: int, ratio: float) -> Masking | None:
        return None if ratio == 0 else masking_from_noise(mask_words[lo:hi], ratio)

    rows = lambda a, lo, hi: None if a is None else a[lo:hi]  # noqa: E731
    branches: list[Branch] = []

    if "clean" in names:
        x0_c = x0[:num_clean]
        branches.append(
            Branch(
                x_t=x0_c,
                t=jnp.zeros((num_clean,), jnp.int32),
                x0=x0_c,
                eps=jnp.zeros_like(x0_c),
                masking=masking(0, num_clean, recipe.m_t0),
                labels=rows(labels, 0, num_clean),
            )
        )

    if batch_size > num_clean:
        lo, hi = num_clean, batch_size
        x0_n = x0[lo:hi]
        lab = rows(labels, lo, hi)
        # Uniform on 1..T up to a modulo bias below T / 2**32.
        t = 1 + (words[lo:hi, 0] % jnp.uint32(schedule.num_steps)).astype(jnp.int32)
        eps = noise(lo, hi, 0)
        mask_n = masking(lo, hi, recipe.m_t)
        if recipe.mdt_two_pass:
            eps_m = noise(lo, hi, 1)
            branches.append(Branch(q_sample(schedule, x0_n, t, eps), t, x0_n, eps, None, lab))
            branches.append(Branch(q_sample(schedule, x0_n, t, eps_m), t, x0_n, eps_m, mask_n, lab))
        else:
            branches.append(Branch(q_sample(schedule, x0_n, t, eps), t, x0_n, eps, mask_n, lab))

    assert len(branches) == len(names)
    return tuple(branches)


__all__ = ["Branch", "masking_from_noise", "mix", "normal_from_bits", "split_batch"]
