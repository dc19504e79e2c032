"""MDT's side-interpolater: predicts the hidden tokens from the visible ones mid-network.

With a mask (training): fill the hidden slots with a shared learned ``mask_token``,
unshuffle to raster order, add the side-interpolater's own learnable position
embedding (q), run ONE block over all L tokens, then the masked shortcut

    out = mask * block(q) + (1 - mask) * q        (mask: 1 = hidden)

so visible tokens pass through as q (their input plus the position embedding) and only
hidden slots take the block's prediction. Without a mask (inference, MDT's full pass)
the block is skipped and the output is input + position embedding.

Parameters (``params['side_interpolater']``): ``~``: ``mask_token`` (W,), ``pos_embed``
(L, W) (unless frozen); ``block``.

Shape glossary: B batch, L patch tokens, K visible tokens, W width.
"""

from __future__ import annotations

import haiku as hk
import jax.numpy as jnp
from jaxtyping import Array, Float

from unidiff.corruption.masking import Masking, unshuffle_tokens
from unidiff.models.attention import bias_index
from unidiff.models.blocks import make_block
from unidiff.models.config import ModelConfig
from unidiff.models.layers import add_batch_shared, normal_002, position_embedding


def side_interpolater_forward(
    cfg: ModelConfig,
    tokens: Float[Array, "b k w"],
    cond: Float[Array, "b w"],
    masking: Masking | None = None,
) -> Float[Array, "b l w"]:
    """Haiku function: visible tokens (shuffle order) -> all L tokens in raster order."""
    dtype = tokens.dtype
    b, k, w = tokens.shape
    pos = position_embedding(cfg.si_pos_embed, cfg.grid_size, w, dtype)
    if masking is None:
        if k != cfg.num_tokens:
            raise ValueError(f"tokens: without masking expected {cfg.num_tokens} tokens, got {k}")
        return add_batch_shared(tokens, pos)
    mask_token = hk.get_parameter("mask_token", (w,), dtype, init=normal_002)
    q = add_batch_shared(unshuffle_tokens(tokens, masking.ids_restore, mask_token.astype(dtype)), pos)
    grid = cfg.grid_size if cfg.rel_pos_bias else None
    index = bias_index(cfg.grid_size, 0) if cfg.rel_pos_bias else None
    block = make_block(cfg.adaln, cfg.num_heads, cfg.mlp_ratio, cfg.norm_affine, cfg.norm_eps,
                       grid, name="block")
    pred = block(q, cond, index)
    # == mask * pred + (1 - mask) * q for a 0/1 mask, and exact for visible tokens.
    return jnp.where(masking.mask[:, :, None] > 0, pred, q)


def make_side_interpolater(cfg: ModelConfig) -> hk.Transformed:
    """Stateless transform: ``apply(params, tokens, cond, masking=None)``."""

    def fn(tokens, cond, masking=None):
        return side_interpolater_forward(cfg, tokens, cond, masking)

    return hk.without_apply_rng(hk.transform(fn))
