"""Transformer blocks and the head against numpy; AdaLN-Zero blocks start as the identity."""

from __future__ import annotations

import haiku as hk
import jax
import numpy as np
import pytest

import unidiff.models as um
from models_testlib import (
    assert_close, jit, np_attention, np_gelu_tanh, np_layer_norm, random_like,
)

B, N, W, HEADS = 2, 6, 16, 2


def _block(adaln, affine):
    def fn(x, cond):
        return um.make_block(adaln, HEADS, 4.0, affine, 1e-6, None, name="blk")(x, cond)

    return hk.without_apply_rng(hk.transform(fn))


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, N, W)).astype(np.float32),
            rng.standard_normal((B, W)).astype(np.float32))


def _np(params):
    """haiku 'blk/attn/qkv' -> nested numpy dict {'attn': {'qkv': {...}}}."""
    out = {}
    for path, leaves in params.items():
        node = out
        for part in path.split("/")[1:]:
            node = node.setdefault(part, {})
        node.update({k: np.asarray(v, np.float64) for k, v in leaves.items()})
    return out


@pytest.mark.parametrize("affine", [True, False])
def test_adaln_block_matches_numpy(affine):
    f = _block(True, affine)
    x, cond = _inputs()
    params = random_like(jax.eval_shape(f.init, jax.random.key(0), x, cond), seed=1)
    got = jit(f.apply)(params, x, cond)
    p = _np(params)
    xn, cn = np.asarray(x, np.float64), np.asarray(cond, np.float64)
    mod = cn @ p["adaln"]["w"] + p["adaln"]["b"]
    sa, ca, ga, sm, cm, gm = np.split(mod, 6, axis=-1)
    n1 = p.get("norm1", {})
    h = np_layer_norm(xn, n1.get("scale"), n1.get("offset")) * (1 + ca[:, None]) + sa[:, None]
    xn = xn + ga[:, None] * np_attention(h, p["attn"], HEADS)
    n2 = p.get("norm2", {})
    h = np_layer_norm(xn, n2.get("scale"), n2.get("offset")) * (1 + cm[:, None]) + sm[:, None]
    m = np_gelu_tanh(h @ p["mlp"]["fc1"]["w"] + p["mlp"]["fc1"]["b"]) @ p["mlp"]["fc2"]["w"] + p["mlp"]["fc2"]["b"]
    want = xn + gm[:, None] * m
    assert ("norm1" in p) == affine and p["mlp"]["fc1"]["w"].shape == (W, 4 * W)
    assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_vit_block_matches_numpy():
    f = _block(False, True)
    x, cond = _inputs(3)
    params = random_like(jax.eval_shape(f.init, jax.random.key(0), x, cond), seed=4)
    got = jit(f.apply)(params, x, cond)
    p = _np(params)
    assert "adaln" not in p
    xn = np.asarray(x, np.float64)
    xn = xn + np_attention(np_layer_norm(xn, p["norm1"]["scale"], p["norm1"]["offset"]), p["attn"], HEADS)
    h = np_layer_norm(xn, p["norm2"]["scale"], p["norm2"]["offset"])
    want = xn + np_gelu_tanh(h @ p["mlp"]["fc1"]["w"] + p["mlp"]["fc1"]["b"]) @ p["mlp"]["fc2"]["w"] + p["mlp"]["fc2"]["b"]
    assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_adaln_block_is_identity_at_init():
    f = _block(True, True)
    x, cond = _inputs(5)
    params = jax.device_get(jit(f.init)(jax.random.key(0), x, cond))
    assert not np.any(params["blk/adaln"]["w"]) and not np.any(params["blk/adaln"]["b"])
    # Everything else is live, so only the zero gates can make it the identity ...
    assert np.any(params["blk/attn/qkv"]["w"]) and np.any(params["blk/mlp/fc2"]["w"])
    apply = jit(f.apply)
    np.testing.assert_array_equal(apply(params, x, cond), x)
    # ... and opening the gates breaks it (so the check above can fail).
    params = dict(params, **{"blk/adaln": {"w": np.full((W, 6 * W), 0.1, np.float32), "b": params["blk/adaln"]["b"]}})
    assert not np.allclose(apply(params, x, cond), x)


@pytest.mark.parametrize("output", ["x0_eps", "eps_sigma", "eps"])
def test_final_layer_and_channel_split(output):
    cfg = um.umd_config("N/2", 4, 3, output=output, width=W, num_heads=HEADS)
    out_dim = 4 * cfg.out_channels

    def fn(x, cond):
        return um.split_output(cfg, um.FinalLayer(out_dim, True, True)(x, cond))

    f = hk.without_apply_rng(hk.transform(fn))
    x, cond = _inputs(6)
    x = x[:, :4]  # L = 4 tokens for a 4x4 image with patch 2
    params = random_like(jax.eval_shape(f.init, jax.random.key(0), x, cond), seed=7)
    pred = jit(f.apply)(params, x, cond)
    p = {k.split("/")[-1]: {kk: np.asarray(v, np.float64) for kk, v in d.items()} for k, d in params.items()}
    shift, scale = np.split(np.asarray(cond, np.float64) @ p["adaln"]["w"] + p["adaln"]["b"], 2, axis=-1)
    h = np_layer_norm(np.asarray(x, np.float64), p["norm"]["scale"], p["norm"]["offset"])
    out = (h * (1 + scale[:, None]) + shift[:, None]) @ p["linear"]["w"] + p["linear"]["b"]
    per_pixel = out.reshape(B, 4, 4, cfg.out_channels)  # (row, col) pixels x channels
    first, second = per_pixel[..., :3].reshape(B, 4, 12), per_pixel[..., 3:].reshape(B, 4, -1)
    if output == "x0_eps":
        assert_close(pred.x0, first, 1e-4, 1e-4), assert_close(pred.eps, second, 1e-4, 1e-4)
        assert pred.sigma is None
    elif output == "eps_sigma":
        assert pred.x0 is None
        assert_close(pred.eps, first, 1e-4, 1e-4), assert_close(pred.sigma, second, 1e-4, 1e-4)
    else:
        assert pred.x0 is None and pred.sigma is None
        assert_close(pred.eps, first, 1e-4, 1e-4)
