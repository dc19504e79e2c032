"""Shared helpers for the model tests: tiny presets, random parameters, a cheap jit.

At initialisation every gate and output layer is zero, so most outputs are exactly 0;
equivalence tests therefore run on random parameters, where they can fail. Random
parameters are drawn in numpy from ``jax.eval_shape(model.init)`` so that no test
pays for compiling the initialiser unless it needs the real init values.

``jit`` compiles with XLA:CPU's backend optimisation level 0 and without the fusion
emitters: compile time dominates these tiny models on CPU (a softmax fusion costs
~0.5 s at the default settings; a tiny model compiles ~5x faster this way), and
neither option changes what the tests check.
"""

from __future__ import annotations

import math

import jax
import numpy as np

import unidiff.models as um

# tests/conftest.py already sets XLA's fast-compile flags for the whole session.
jit = jax.jit

IMAGE = 8  # 8x8 images, patch 2 -> L = 16 tokens
NUM_CLASSES = 5
TINY = dict(width=32, num_heads=2, depth=1, decoder_depth=1)


def tiny_configs() -> dict[str, um.ModelConfig]:
    """One tiny config per preset (plus UMD with the side-interpolater switched on)."""
    small_dec = dict(decoder_width=16, decoder_heads=2)
    return {
        "umd": um.umd_config("S/2", IMAGE, 3, num_classes=NUM_CLASSES, **TINY),
        "umd_si": um.umd_config("S/2", IMAGE, 3, num_classes=NUM_CLASSES, side_interpolater=True, **TINY),
        "dit": um.dit_config("S/2", IMAGE, 4, num_classes=NUM_CLASSES, **dict(TINY, decoder_depth=0)),
        "mae": um.mae_config("S/2", IMAGE, 3, **small_dec, **TINY),
        "maskdit": um.maskdit_config("S/2", IMAGE, 4, num_classes=NUM_CLASSES, **small_dec, **TINY),
        "mdt": um.mdt_config("N/2", IMAGE, 4, num_classes=NUM_CLASSES, **TINY),
    }


def random_like(shapes, seed: int = 0, scale: float = 0.3):
    """A pytree of N(0, scale^2) arrays with the shapes and dtypes of ``shapes``.

    Plain numpy arrays: jitted functions take them as they are, whereas jnp.asarray
    and device-side casts would each compile a tiny program per shape."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def host_cast(tree, dtype):
    """Cast every leaf on the host (ml_dtypes gives numpy bfloat16)."""
    return jax.tree.map(lambda a: np.asarray(a).astype(dtype), tree)


def random_params(model: um.Model, seed: int = 0, scale: float = 0.3):
    return random_like(jax.eval_shape(model.init, jax.random.key(0)), seed, scale)


def inputs(cfg: um.ModelConfig, batch: int = 3, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.num_tokens, cfg.patch_dim)).astype(np.float32)
    t = rng.integers(0, 1001, batch).astype(np.int32)
    labels = rng.integers(0, NUM_CLASSES + 1, batch).astype(np.int32) if cfg.num_classes else None
    return x, t, labels


def assert_close(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol)


def np_attention(x, p, heads, bias=None):
    """Softmax attention in float64, per head, from the qkv/proj parameters."""
    b, n, w = x.shape
    d = w // heads
    qkv = (x @ p["qkv"]["w"] + p["qkv"]["b"]).reshape(b, n, 3, heads, d)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
    if bias is not None:
        logits = logits + bias
    logits = logits - logits.max(-1, keepdims=True)
    a = np.exp(logits)
    a = a / a.sum(-1, keepdims=True)
    out = (a @ v).transpose(0, 2, 1, 3).reshape(b, n, w)
    return out @ p["proj"]["w"] + p["proj"]["b"]


def np_layer_norm(x, scale=None, offset=None, eps=1e-6):
    y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return y if scale is None else y * scale + offset


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


# --------------------------------------------------------------------------------------
# Float64 numpy forwards built from the parameters alone (REFERENCE sec. 2 and 3).
# --------------------------------------------------------------------------------------
def np_params(params):
    """Haiku ``{'a/b': {'w': ...}}`` -> nested float64 dicts ``{'a': {'b': {'w': ...}}}``
    (top-level parameters stay under ``'~'``)."""
    out = {}
    for path, leaves in params.items():
        node = out
        for part in path.split("/"):
            node = node.setdefault(part, {})
        node.update({k: np.asarray(v, np.float64) for k, v in leaves.items()})
    return out


def np_dense(x, p):
    return x @ p["w"] + p["b"]


def np_silu(x):
    return x / (1 + np.exp(-x))


def np_norm(x, p, name, shift=None, scale=None, eps=1e-6):
    """LayerNorm with the affine of ``p[name]`` when it has one, then the adaLN modulation."""
    affine = p.get(name, {})
    y = np_layer_norm(x, affine.get("scale"), affine.get("offset"), eps)
    return y if shift is None else y * (1 + scale[:, None]) + shift[:, None]


def np_block(x, cond, p, heads, adaln, bias=None):
    """One transformer block: AdaLN-Zero (DiT) or plain pre-norm ViT."""

    def mlp(h):
        return np_dense(np_gelu_tanh(np_dense(h, p["mlp"]["fc1"])), p["mlp"]["fc2"])

    if not adaln:
        x = x + np_attention(np_norm(x, p, "norm1"), p["attn"], heads, bias)
        return x + mlp(np_norm(x, p, "norm2"))
    sa, ca, ga, sm, cm, gm = np.split(np_dense(cond, p["adaln"]), 6, axis=-1)
    x = x + ga[:, None] * np_attention(np_norm(x, p, "norm1", sa, ca), p["attn"], heads, bias)
    return x + gm[:, None] * mlp(np_norm(x, p, "norm2", sm, cm))


def np_rel_bias(table, grid):
    """(H, L, L) relative position bias of raster tokens: the pair (i, j) reads table row
    (dr + g - 1)(2g - 1) + (dc + g - 1) for the row / column offsets of i from j."""
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    dr = rows[:, None] - rows[None, :] + grid - 1
    dc = cols[:, None] - cols[None, :] + grid - 1
    return table[dr * (2 * grid - 1) + dc].transpose(2, 0, 1)


def np_fill_hidden(visible, masking, fill):
    """Raster-order sequence from the K visible tokens (shuffle order, i.e. in the order
    of ``masking.ids_keep``); every slot that ``masking.mask`` hides gets ``fill``.
    Built from ids_keep and mask, not from ids_restore."""
    ids_keep = np.asarray(masking.ids_keep)
    hidden = np.asarray(masking.mask) > 0
    b, k, d = visible.shape
    assert ((~hidden).sum(1) == k).all() and not np.take_along_axis(hidden, ids_keep, 1).any()
    full = np.full((b, hidden.shape[1], d), np.nan)
    full[hidden] = fill
    full[np.arange(b)[:, None], ids_keep] = visible
    assert not np.isnan(full).any()
    return full
