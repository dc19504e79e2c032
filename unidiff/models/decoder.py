"""The decoder: full-length token sequence + conditioning -> per-patch x0 / eps.

Input is either the encoder's K visible tokens in shuffle order plus ``ids_restore``
(hidden slots are filled with the learned ``mask_token`` and everything unshuffled to
raster order), or a full raster-order sequence of L tokens (no masking, or the output
of the side-interpolater). Then: + decoder position embedding (if any); prepend the
pooled CLS representation (when the encoder has CLS tokens) and, in MAE mode, the
conditioning token; ``decoder_depth`` blocks; drop the prepended tokens; final layer
(LN, shift/scale from cond, linear to p*p*out_channels).

When ``decoder_width != width`` a ``decoder_embed`` projection (LN + AdaLN shift/scale
+ Dense as in MaskDiT; a plain Dense in MAE mode) maps the encoder's tokens first.

Output channels per pixel: ``x0_eps``: first C = x0, last C = eps; ``eps_sigma`` (DiT
learn_sigma): first C = eps, last C = sigma (x0 = None); ``eps``: C = eps.

Parameters (``params['decoder']``): ``~``: ``mask_token`` (Wd,), ``pos_embed``;
modules ``decoder_embed``, ``block_<i>``, ``final_layer``.

Shape glossary: B batch, N input tokens (K or L), L patch tokens, W encoder width,
Wd decoder width, E prepended tokens, P = p*p*C values per patch.
"""

from __future__ import annotations

import haiku as hk
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from unidiff.corruption.masking import unshuffle_tokens
from unidiff.models.attention import bias_index
from unidiff.models.blocks import FinalLayer, make_block
from unidiff.models.config import ModelConfig
from unidiff.models.layers import LayerNorm, add_batch_shared, dense, normal_002, position_embedding
from unidiff.models.outputs import Prediction


class DecoderEmbed(hk.Module):
    """Encoder width -> decoder width: [LN + AdaLN shift/scale] + Dense."""

    def __init__(self, cfg: ModelConfig, name: str = "decoder_embed"):
        super().__init__(name=name)
        self.cfg = cfg

    def __call__(self, x: Float[Array, "b n w"], cond: Float[Array, "b w"]) -> Float[Array, "b n wd"]:
        cfg = self.cfg
        if cfg.adaln:
            shift, scale = jnp.split(dense(2 * x.shape[-1], "adaln", zero_init=True)(cond), 2, axis=-1)
            x = LayerNorm(cfg.norm_affine, cfg.norm_eps, name="norm")(x, shift, scale)
        return dense(cfg.dec_width, "linear")(x)


def decoder_forward(
    cfg: ModelConfig,
    tokens: Float[Array, "b n w"],
    rep: Float[Array, "b w"],
    cond: Float[Array, "b w"],
    ids_restore: Int[Array, "b l"] | None = None,
) -> Prediction:
    """Haiku function: decode to a Prediction of (B, L, P) arrays."""
    dtype = tokens.dtype
    b, n, w = tokens.shape
    length = cfg.num_tokens
    if ids_restore is None and n != length:
        raise ValueError(f"tokens: without ids_restore the decoder needs all {length} tokens, got {n}")
    if ids_restore is not None and n < length and not cfg.decoder_has_mask_token:
        raise ValueError(
            "masking: this config has no decoder mask token (mask_token=False, e.g. "
            "dit_config), so it cannot take input that hides tokens; build it with "
            "mask_token=True or use maskdit_config / umd_config"
        )

    extras = []
    if cfg.num_cls_tokens:
        extras.append(rep[:, None, :])
    if not cfg.adaln:
        extras.append(cond[:, None, :])
    num_extra = len(extras)
    x = tokens
    if cfg.dec_width != w:
        x = DecoderEmbed(cfg)(jnp.concatenate(extras + [x], axis=1), cond)
        extras, x = [x[:, :num_extra]], x[:, num_extra:]
    wd = x.shape[-1]

    if ids_restore is not None:
        if cfg.decoder_has_mask_token:
            fill = hk.get_parameter("mask_token", (wd,), dtype, init=normal_002).astype(x.dtype)
        else:  # nothing is hidden (checked above): the fill is empty
            fill = jnp.zeros((wd,), x.dtype)
        x = unshuffle_tokens(x, ids_restore, fill)
    pos = position_embedding(cfg.decoder_pos_embed, cfg.grid_size, wd, dtype)
    if pos is not None:
        x = add_batch_shared(x, pos)
    if num_extra:
        x = jnp.concatenate(extras + [x], axis=1)

    grid = cfg.grid_size if cfg.rel_pos_bias else None
    index = bias_index(cfg.grid_size, num_extra) if cfg.rel_pos_bias else None
    for i in range(cfg.decoder_depth):
        block = make_block(cfg.adaln, cfg.dec_heads, cfg.mlp_ratio, cfg.norm_affine, cfg.norm_eps,
                           grid, name=f"block_{i}")
        x = block(x, cond, index)
    x = x[:, num_extra:]

    out_dim = cfg.patch_size**2 * cfg.out_channels
    out = FinalLayer(out_dim, cfg.adaln, cfg.norm_affine, cfg.norm_eps)(x, cond if cfg.adaln else None)
    return split_output(cfg, out.astype(dtype))


def split_output(cfg: ModelConfig, out: Float[Array, "b l o"]) -> Prediction:
    """(B, L, p*p*C_out) head output -> Prediction, splitting channels per pixel."""
    b, length, _ = out.shape
    c = cfg.in_channels
    if cfg.output == "eps":
        return Prediction(x0=None, eps=out, sigma=None)
    per_pixel = out.reshape(b, length, cfg.patch_size**2, 2 * c)
    first = per_pixel[..., :c].reshape(b, length, -1)
    second = per_pixel[..., c:].reshape(b, length, -1)
    if cfg.output == "x0_eps":
        return Prediction(x0=first, eps=second, sigma=None)
    return Prediction(x0=None, eps=first, sigma=second)


def make_decoder(cfg: ModelConfig) -> hk.Transformed:
    """Stateless transform: ``apply(params, tokens, rep, cond, ids_restore=None)``."""

    def fn(tokens, rep, cond, ids_restore=None):
        return decoder_forward(cfg, tokens, rep, cond, ids_restore)

    return hk.without_apply_rng(hk.transform(fn))
