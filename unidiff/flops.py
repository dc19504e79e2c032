"""Analytic FLOPs of one training step: what a recipe costs on a given model and batch.

UMD's practical claim is a cheaper step than DiT at equal quality, because the encoder
runs on the visible tokens only. This module counts the matrix-multiply work of one
train step from the model configuration and the recipe's real token counts, so the
benchmark suite (``benchmarks/step_throughput.py``) can turn step times into achieved
FLOP/s and MFU, and predict each recipe's step time relative to DiT.

Counting convention (the usual "model FLOPs" of MFU reports):
  * a multiply-add is 2 FLOPs: a Dense layer from d_in to d_out on N tokens costs
    2 * N * d_in * d_out;
  * attention counts its four matmuls: the fused qkv projection (6 N W^2), the scores
    Q K^T (2 N^2 W), the weighted sum A V (2 N^2 W) and the output projection
    (2 N W^2); the head count does not change these totals;
  * the MLP is two Dense layers (4 N W H, H = int(W * mlp_ratio));
  * per example, not per token: AdaLN modulation Dense(cond -> 6 W) in every block,
    (cond -> 2 W) in the final layer and the decoder embedding, and the time MLP
    (F -> W -> W) -- the per-example cost that ``jax`` pays once per row;
  * patch embedding (2 K P W, on the kept tokens only: the encoder gathers before it
    embeds), decoder embedding projection, and the output head (2 L Wd O,
    O = p*p*out_channels) are included;
  * ignored: every elementwise or reduction op (LayerNorm, modulation, softmax, GELU,
    SiLU, residual adds, bias adds, gathers/scatters of tokens and of the relative
    position bias, label-table lookups, sinusoid features), the corruption (noise,
    argsort of the mask), the loss, gradient clipping and the AdamW update. They are a
    few percent of the total for the sizes benchmarked and would make the count depend
    on implementation details rather than on the architecture;
  * backward = 2 x forward (gradients w.r.t. activations and w.r.t. weights), so a
    training step is 3 x forward. This is the standard convention; it slightly
    over-counts the first layer, whose input gradient is not needed.

Token counts per branch (one forward per branch, as the train step does): the encoder
runs ``depth`` blocks on K visible tokens + ``num_cls_tokens`` CLS tokens (+ 1
conditioning token in MAE mode, ``adaln=False``); the side-interpolater (MDT) runs one
block on all L tokens when the branch is masked; the decoder runs ``decoder_depth``
blocks on L tokens + the prepended pooled representation (when there are CLS tokens) +
the conditioning token (MAE mode). K = L for an unmasked branch, ``num_kept(L, m)``
otherwise; the clean branch has ``split_batch(B, r_t0)[0]`` rows, MDT two-pass training
runs the noisy rows twice (full and masked).
"""

from __future__ import annotations

import numbers
from typing import Any

from unidiff.corruption import recipes as _recipes
from unidiff.corruption.mixing import split_batch
from unidiff.models.config import ModelConfig

BACKWARD_FACTOR = 2  # backward pass = 2 x forward; a train step = 3 x forward


def dense_flops(tokens: int, d_in: int, d_out: int) -> int:
    """2 * tokens * d_in * d_out (biases ignored)."""
    return 2 * tokens * d_in * d_out


def block_flops(tokens: int, width: int, mlp_ratio: float, cond_width: int | None) -> dict[str, int]:
    """One transformer block on ``tokens`` tokens of ``width``, for ONE example.

    ``cond_width`` is the conditioning width of the AdaLN modulation Dense(cond -> 6W),
    or None for a plain pre-norm block (MAE mode)."""
    n, w = tokens, width
    hidden = int(w * mlp_ratio)
    parts = {
        "qkv": dense_flops(n, w, 3 * w),
        "attn_scores": 2 * n * n * w,  # Q K^T summed over heads: H * (2 n n D), D = W / H
        "attn_values": 2 * n * n * w,  # A V
        "attn_proj": dense_flops(n, w, w),
        "mlp": dense_flops(n, w, hidden) + dense_flops(n, hidden, w),
        "adaln": 0 if cond_width is None else dense_flops(1, cond_width, 6 * w),
    }
    return parts


def _sum_blocks(count: int, parts: dict[str, int]) -> int:
    return count * sum(parts.values())


def forward_flops(config: ModelConfig, num_visible: int | None = None) -> dict[str, int]:
    """Forward FLOPs for ONE example, by part.

    ``num_visible``: K, the tokens the encoder sees (the branch is masked), or None for
    an unmasked forward (K = L, no side-interpolater block). Keys: ``time_embed``,
    ``patch_embed``, ``encoder``, ``side_interpolater``, ``decoder_embed``,
    ``decoder``, ``final_layer``; of which ``attention`` (the two N^2 matmuls in every
    block) is reported separately as ``attention_core`` for reference (already
    included in encoder/decoder/side_interpolater).
    """
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config: expected a ModelConfig, got {type(config).__name__}")
    cfg = config
    length, w, wd = cfg.num_tokens, cfg.width, cfg.dec_width
    masked = num_visible is not None
    # int() would truncate a fractional count (2.9 -> 2) and read True as 1 token.
    if masked and (isinstance(num_visible, bool) or not isinstance(num_visible, numbers.Integral)):
        raise ValueError(f"num_visible: expected an integer in [1, {length}] or None, got {num_visible!r}")
    k = length if num_visible is None else int(num_visible)
    if not 1 <= k <= length:
        raise ValueError(f"num_visible: expected an integer in [1, {length}] or None, got {num_visible!r}")
    cond_w = w if cfg.adaln else None

    enc_extra = cfg.num_cls_tokens + (0 if cfg.adaln else 1)
    dec_extra = (1 if cfg.num_cls_tokens else 0) + (0 if cfg.adaln else 1)
    enc_tokens = k + enc_extra
    dec_tokens = length + dec_extra

    enc_block = block_flops(enc_tokens, w, cfg.mlp_ratio, cond_w)
    dec_block = block_flops(dec_tokens, wd, cfg.mlp_ratio, cond_w)
    si_block = block_flops(length, w, cfg.mlp_ratio, cond_w)
    si_runs = cfg.side_interpolater and masked

    out = {
        "time_embed": dense_flops(1, cfg.frequency_dim, w) + dense_flops(1, w, w),
        "patch_embed": dense_flops(k, cfg.patch_dim, w),
        "encoder": _sum_blocks(cfg.depth, enc_block),
        "side_interpolater": _sum_blocks(1, si_block) if si_runs else 0,
        "decoder_embed": 0,
        "decoder": _sum_blocks(cfg.decoder_depth, dec_block),
        "final_layer": dense_flops(length, wd, cfg.patch_size**2 * cfg.out_channels)
        + (dense_flops(1, w, 2 * wd) if cfg.adaln else 0),
    }
    if wd != w:
        # DecoderEmbed: [AdaLN shift/scale from cond] + Dense(W -> Wd) on the encoder's
        # K tokens and the prepended extras.
        out["decoder_embed"] = dense_flops(k + dec_extra, w, wd) + (dense_flops(1, w, 2 * w) if cfg.adaln else 0)
    attn = lambda p: p["attn_scores"] + p["attn_values"]  # noqa: E731
    out["attention_core"] = (
        cfg.depth * attn(enc_block) + cfg.decoder_depth * attn(dec_block) + (attn(si_block) if si_runs else 0)
    )
    return out


FORWARD_PARTS = ("time_embed", "patch_embed", "encoder", "side_interpolater", "decoder_embed", "decoder", "final_layer")


def _forward_total(parts: dict[str, int]) -> int:
    return sum(parts[p] for p in FORWARD_PARTS)


def branch_layout(recipe: _recipes.Recipe, num_tokens: int, batch_size: int, num_devices: int = 1
                  ) -> list[tuple[str, int, int | None]]:
    """[(branch name, rows, K or None = unmasked)] of one train step, in ``mix`` order."""
    if not isinstance(recipe, _recipes.Recipe):
        raise ValueError(f"recipe: expected a Recipe, got {type(recipe).__name__}")
    n_clean, n_noisy = split_batch(batch_size, recipe.r_t0, num_devices)
    k_clean, k_noisy = recipe.keep_counts(num_tokens)
    vis = lambda ratio, k: None if ratio == 0 else k  # noqa: E731
    layout = []
    if n_clean:
        layout.append(("clean", n_clean, vis(recipe.m_t0, k_clean)))
    if n_noisy:
        if recipe.mdt_two_pass:
            layout.append(("full", n_noisy, None))
            layout.append(("masked", n_noisy, vis(recipe.m_t, k_noisy)))
        else:
            layout.append(("noisy", n_noisy, vis(recipe.m_t, k_noisy)))
    return layout


def train_step_flops(
    config: ModelConfig, recipe: _recipes.Recipe, batch_size: int, num_devices: int = 1
) -> dict[str, Any]:
    """FLOPs of one training step (forward + backward) for the global batch.

    Returns a dict with ``total`` (int, forward + backward), ``forward``, ``backward``,
    ``parts`` (forward + backward by model part, summed over branches) and
    ``branches``: {name: {rows, visible_tokens, encoder_tokens, decoder_tokens,
    forward_per_example, forward, total}}.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    if not isinstance(config, ModelConfig):  # before config.num_tokens below
        raise ValueError(f"config: expected a ModelConfig, got {type(config).__name__}")
    length = config.num_tokens
    factor = 1 + BACKWARD_FACTOR
    branches: dict[str, dict[str, Any]] = {}
    parts = {p: 0 for p in FORWARD_PARTS + ("attention_core",)}
    forward = 0
    for name, rows, k in branch_layout(recipe, length, batch_size, num_devices):
        per = forward_flops(config, k)
        fwd = rows * _forward_total(per)
        forward += fwd
        for p in parts:
            parts[p] += factor * rows * per[p]
        kk = length if k is None else k
        branches[name] = {
            "rows": rows,
            "visible_tokens": kk,
            "encoder_tokens": kk + config.num_cls_tokens + (0 if config.adaln else 1),
            "decoder_tokens": length + (1 if config.num_cls_tokens else 0) + (0 if config.adaln else 1),
            "forward_per_example": _forward_total(per),
            "forward": fwd,
            "total": factor * fwd,
        }
    return {
        "total": factor * forward,
        "forward": forward,
        "backward": BACKWARD_FACTOR * forward,
        "parts": parts,
        "branches": branches,
    }


def flops_ratio(
    config: ModelConfig,
    recipe_a: _recipes.Recipe,
    recipe_b: _recipes.Recipe,
    batch_size: int,
    config_b: ModelConfig | None = None,
) -> float:
    """FLOPs of a step of ``recipe_a`` over a step of ``recipe_b`` at the same batch.

    Both on ``config`` unless ``config_b`` gives recipe b its own architecture (as the
    benchmark does when recipes use different models, e.g. MDT's side-interpolater)."""
    a = train_step_flops(config, recipe_a, batch_size)["total"]
    b = train_step_flops(config if config_b is None else config_b, recipe_b, batch_size)["total"]
    return a / b
