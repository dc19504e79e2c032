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
