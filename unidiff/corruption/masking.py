"""MAE-style random patch masking with static keep counts.

Per sample, draw uniform noise over the L tokens and argsort it: the first K indices
(``ids_keep``) stay visible, the rest are hidden. ``ids_restore`` is the inverse
permutation, so tokens laid out as ``[visible..., hidden...]`` (shuffled order) return
to raster order by ``take_along_axis(shuffled, ids_restore)``. K = int(L * (1 - ratio))
depends only on Python numbers, so every shape is static under ``jit``.

Mask convention: ``mask[b, l] = 1`` means token l is hidden, 0 means visible.

Shape glossary: B batch, L tokens, K kept (visible) tokens, D features per token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray


class Masking(NamedTuple):
    """One draw of random masking for a batch (a pytree of arrays)."""

    ids_keep: Int[Array, "b k"]  # raster indices of visible tokens, in shuffle order
    ids_restore: Int[Array, "b l"]  # inverse of the shuffle permutation
    mask: Float[Array, "b l"]  # 1 = hidden, 0 = visible, raster order


def num_kept(num_tokens: int, mask_ratio: float) -> int:
    """K = int(L * (1 - ratio)): the static number of visible tokens."""
    for name, value in (("num_tokens", num_tokens), ("mask_ratio", mask_ratio)):
        if isinstance(value, jax.core.Tracer):  # K sets a shape: it cannot depend on a trace
            raise ValueError(f"{name} must be a static Python number (it sets the shape K), got "
                             "a traced value; under jit mark it static (static_argnums)")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    k = int(num_tokens * (1.0 - mask_ratio))
    if k < 1:
        raise ValueError(
            f"mask_ratio={mask_ratio} keeps 0 of {num_tokens} tokens; lower the ratio"
        )
    return k


def random_masking(
    key: PRNGKeyArray, batch_size: int, num_tokens: int, mask_ratio: float
) -> Masking:
    """Independent random masks per row, each keeping exactly K tokens."""
    k = num_kept(num_tokens, mask_ratio)
    noise = jax.random.uniform(key, (batch_size, num_tokens))
    ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
    ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
    ids_keep = ids_shuffle[:, :k]
    # Position r in shuffle order is hidden iff r >= K; map back to raster order.
    mask_shuffled = (jnp.arange(num_tokens) >= k).astype(jnp.float32)
    mask = jnp.take_along_axis(
        jnp.broadcast_to(mask_shuffled, (batch_size, num_tokens)), ids_restore, axis=1
    )
    return Masking(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask)


def no_masking(batch_size: int, num_tokens: int) -> Masking:
    """The identity masking: every token visible, in raster order."""
    ids = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (batch_size, num_tokens))
    return Masking(ids_keep=ids, ids_restore=ids, mask=jnp.zeros((batch_size, num_tokens), jnp.float32))


def gather_tokens(x: Float[Array, "b l *d"], ids_keep: Int[Array, "b k"]) -> Float[Array, "b k *d"]:
    """Select the visible tokens (in shuffle order) from a full-length sequence."""
    if ids_keep.ndim != 2 or x.ndim < 2 or x.shape[0] != ids_keep.shape[0]:
        # take_along_axis would broadcast a batch of 1 on either side over the other.
        raise ValueError(f"x must be (B, L, ...) and ids (B, K) with the same B; got x "
                         f"{x.shape} and ids {ids_keep.shape}")
    idx = ids_keep.reshape(ids_keep.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def unshuffle_tokens(
    visible: Float[Array, "b k d"],
    ids_restore: Int[Array, "b l"],
    fill: Float[Array, "..."],
) -> Float[Array, "b l d"]:
    """Put visible tokens back at their raster positions; hidden slots get ``fill``.

    ``fill`` is either one token, shape (D,) (e.g. a learned mask token), or the hidden
    tokens themselves in shuffle order, shape (B, L - K, D).
    """
    if visible.ndim != 3 or ids_restore.ndim != 2 or ids_restore.shape[0] != visible.shape[0]:
        raise ValueError(f"visible must be (B, K, D) and ids_restore (B, L) with the same B; got "
                         f"visible {visible.shape} and ids_restore {ids_restore.shape}")
    b, k, d = visible.shape
    l = ids_restore.shape[1]
    if k > l:
        raise ValueError(f"visible has K={k} tokens, more than ids_restore's L={l}; pass the "
                         "visible tokens (B, K, D) and ids_restore (B, L), in that order")
    fill = jnp.asarray(fill, visible.dtype)
    if fill.ndim == 1:
        fill = jnp.broadcast_to(fill, (b, l - k, d))
    if fill.shape != (b, l - k, d):
        raise ValueError(
            f"fill must have shape ({d},) or {(b, l - k, d)}, got {fill.shape}"
        )
    shuffled = jnp.concatenate([visible, fill], axis=1)
    return gather_tokens(shuffled, ids_restore)
