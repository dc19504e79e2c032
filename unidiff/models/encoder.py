"""The encoder: visible patch tokens (+ CLS tokens) + conditioning -> encoded tokens.

The raw patch tokens are gathered by ``ids_keep`` BEFORE the patch embedding, so every
array after the gather has K tokens: compute scales with the kept tokens, not L. Then:
patch embedding (a linear layer on p*p*C patch values == conv with kernel = stride =
p), + gathered position embedding, prepend [conditioning token (MAE mode only)] and
``num_cls_tokens`` zero-initialised CLS tokens (no position embedding), ``depth``
blocks, optional final LayerNorm. Representation = mean of the CLS outputs after the
final norm (mean of the patch tokens when there are no CLS tokens).

Parameters (``params['encoder']``): top level ``~``: ``pos_embed`` (unless frozen or
none), ``cls_tokens`` (num_cls_tokens, W); modules ``patch_embed``, ``time_embed``,
``label_embed`` (if num_classes > 0), ``block_<i>``, ``norm``.

Shape glossary: B batch, L patch tokens, K kept tokens (K = L without masking),
P = p*p*C values per patch, W width, E extra tokens in front (cond token + CLS).
"""

from __future__ import annotations

import haiku as hk
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from unidiff.corruption.masking import gather_tokens
from unidiff.models.attention import bias_index
from unidiff.models.blocks import make_block
from unidiff.models.config import ModelConfig
from unidiff.models.layers import LayerNorm, add_batch_shared, conditioning, dense, position_embedding
from unidiff.models.outputs import EncoderOutput


def encoder_forward(
    cfg: ModelConfig,
    x_t: Float[Array, "b l p"],
    t: Int[Array, "b"],
    labels: Int[Array, "b"] | None = None,
    ids_keep: Int[Array, "b k"] | None = None,
) -> EncoderOutput:
    """Haiku function (call inside ``hk.transform``): encode the visible tokens."""
    dtype = x_t.dtype
    b = x_t.shape[0]
    w = cfg.width
    cond = conditioning(
        t, labels, width=w, num_classes=cfg.num_classes, freq_dim=cfg.frequency_dim,
        freq_order=cfg.freq_order, max_period=cfg.max_period, dtype=dtype,
    )
    x = x_t if ids_keep is None else gather_tokens(x_t, ids_keep)
    x = dense(w, "patch_embed")(x)
    pos = position_embedding(cfg.pos_embed, cfg.grid_size, w, dtype)
    if pos is not None:
        x = add_batch_shared(x, pos) if ids_keep is None else x + jnp.take(pos, ids_keep, axis=0)

    extras = []
    if not cfg.adaln:
        extras.append(cond[:, None, :])
    if cfg.num_cls_tokens:
        cls = hk.get_parameter("cls_tokens", (cfg.num_cls_tokens, w), dtype, init=jnp.zeros)
        extras.append(jnp.broadcast_to(cls.astype(x.dtype), (b, cfg.num_cls_tokens, w)))
    num_extra = sum(e.shape[1] for e in extras)
    if extras:
        x = jnp.concatenate(extras + [x], axis=1)

    grid = cfg.grid_size if cfg.rel_pos_bias else None
    index = bias_index(cfg.grid_size, num_extra, ids_keep) if cfg.rel_pos_bias else None
    for i in range(cfg.depth):
        block = make_block(cfg.adaln, cfg.num_heads, cfg.mlp_ratio, cfg.norm_affine, cfg.norm_eps,
                           grid, name=f"block_{i}")
        x = block(x, cond, index)
    if cfg.encoder_norm:
        x = LayerNorm(cfg.norm_affine, cfg.norm_eps, name="norm")(x)

    tokens = x[:, num_extra:]
    pooled = x[:, num_extra - cfg.num_cls_tokens : num_extra] if cfg.num_cls_tokens else tokens
    rep = jnp.mean(pooled.astype(jnp.float32), axis=1).astype(x.dtype)
    return EncoderOutput(tokens=tokens, rep=rep, cond=cond)


def make_encoder(cfg: ModelConfig) -> hk.Transformed:
    """Stateless transform: ``apply(params, x_t, t, labels=None, ids_keep=None)``."""

    def fn(x_t, t, labels=None, ids_keep=None):
        return encoder_forward(cfg, x_t, t, labels, ids_keep)

    return hk.without_apply_rng(hk.transform(fn))
