"""Building blocks against independent numpy formulas."""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import unidiff.models as um
from models_testlib import assert_close, jit, np_attention, random_like
from tests.e2e_helpers import ROOT, child_env


def np_sincos_2d(dim, grid):
    """Loop-by-loop 2-D sin-cos table: first half column index, second half row index."""
    out = np.zeros((grid * grid, dim))
    quarter = dim // 4
    for r in range(grid):
        for c in range(grid):
            for k in range(quarter):
                w = 1.0 / 10000 ** (k / quarter)
                out[r * grid + c, k] = math.sin(c * w)
                out[r * grid + c, quarter + k] = math.cos(c * w)
                out[r * grid + c, 2 * quarter + k] = math.sin(r * w)
                out[r * grid + c, 3 * quarter + k] = math.cos(r * w)
    return out


@settings(max_examples=10, deadline=None)
@given(grid=st.integers(1, 6), quarter=st.integers(1, 6))
def test_sincos_2d_matches_formula(grid, quarter):
    dim = 4 * quarter
    np.testing.assert_allclose(um.sincos_2d(dim, grid), np_sincos_2d(dim, grid), atol=1e-6)


def test_sincos_rejects_bad_dim():
    with pytest.raises(ValueError, match="dim"):
        um.sincos_2d(6, 3)


@settings(max_examples=6, deadline=None)
@given(dim=st.integers(2, 40), order=st.sampled_from(["sin_cos", "cos_sin"]),
       t=st.lists(st.integers(0, 1000), min_size=3, max_size=3))
def test_timestep_features_match_formula(dim, order, t):
    features = jit(um.timestep_features, static_argnums=(1, 2))
    got = np.asarray(features(jnp.asarray(t), dim, order))
    half = dim // 2
    want = np.zeros((len(t), dim))
    for i, ti in enumerate(t):
        for k in range(half):
            arg = ti * math.exp(-math.log(10000.0) * k / half)
            s, c = math.sin(arg), math.cos(arg)
            want[i, k], want[i, half + k] = (s, c) if order == "sin_cos" else (c, s)
    assert got.shape == (len(t), dim)
    np.testing.assert_allclose(got, want, atol=2e-4)  # float32 args up to 1000


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_numpy_and_keeps_dtype(affine):
    f = hk.without_apply_rng(hk.transform(lambda x: um.LayerNorm(affine, 1e-6)(x)))
    x = jnp.asarray(3.0 + 2.0 * np.random.default_rng(0).standard_normal((2, 5, 8)), jnp.float32)
    shapes = jax.eval_shape(f.init, jax.random.key(1), x)
    assert bool(shapes) == affine
    params = {"layer_norm": {"scale": jnp.arange(8.0) / 4, "offset": jnp.ones(8) * 0.5}} if affine else {}
    apply = jit(f.apply)
    y = apply(params, x)
    xn = np.asarray(x, np.float64)
    want = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-6)
    if affine:
        want = want * (np.arange(8) / 4) + 0.5
    assert_close(y, want, rtol=1e-4, atol=1e-4)
    # bfloat16 in -> bfloat16 out, statistics computed in float32 (a large common
    # offset would wipe out the signal if the mean were taken in bfloat16).
    xb = (x + 100.0).astype(jnp.bfloat16)
    pb = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    yb = apply(pb, xb)
    assert yb.dtype == jnp.bfloat16
    xbn = np.asarray(xb.astype(jnp.float32), np.float64)
    wantb = (xbn - xbn.mean(-1, keepdims=True)) / np.sqrt(xbn.var(-1, keepdims=True) + 1e-6)
    if affine:
        wantb = wantb * (np.arange(8) / 4) + 0.5
    assert_close(yb.astype(jnp.float32), wantb, rtol=3e-2, atol=3e-2)


def _composed_norm(x, eps, gamma, beta, shift, scale):
    """LayerNorm (+ affine, + modulation) as plain jnp, float32: the reference whose
    autodiff gradient the hand-written one must match."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, -1, keepdims=True)
    y = (x - mean) / jnp.sqrt(jnp.mean((x - mean) ** 2, -1, keepdims=True) + eps)
    if gamma is not None:
        y = y * gamma.astype(jnp.float32)
    if beta is not None:
        y = y + beta.astype(jnp.float32)
    if shift is not None:
        y = um.modulate(y, shift.astype(jnp.float32), scale.astype(jnp.float32))
    return y


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(1, 6), d=st.integers(2, 24), affine=st.sampled_from(["none", "gamma", "beta", "both"]),
       modulated=st.booleans(), seed=st.integers(0, 2**16))
# Every affine case with modulation, always: the scale gradient's beta term exists only
# there, and ten random draws miss it in about one run in ten.
@example(b=2, n=3, d=5, affine="both", modulated=True, seed=0)
@example(b=2, n=3, d=5, affine="beta", modulated=True, seed=1)
@example(b=2, n=3, d=5, affine="gamma", modulated=True, seed=2)
@example(b=2, n=3, d=5, affine="none", modulated=True, seed=3)
def test_layer_norm_values_and_gradients_match_autodiff(b, n, d, affine, modulated, seed):
    rng = np.random.default_rng(seed)
    # Rows with a standard deviation of 0.5-3: the gradient of a row whose entries nearly
    # coincide (d = 2 draws them within 1e-3 of each other now and then) is a float32
    # cancellation of terms ~1/sigma that neither implementation gets to 1e-4.
    z = rng.standard_normal((b, n, d))
    z = (z - z.mean(-1, keepdims=True)) / np.maximum(z.std(-1, keepdims=True), 1e-12)
    x = (1.5 + rng.uniform(0.5, 3.0, (b, n, 1)) * z).astype(np.float32)
    gamma = (1 + 0.3 * rng.standard_normal(d)).astype(np.float32) if affine in ("gamma", "both") else None
    beta = (0.3 * rng.standard_normal(d)).astype(np.float32) if affine in ("beta", "both") else None
    shift, scale = ((0.3 * rng.standard_normal((b, d))).astype(np.float32) for _ in range(2)) if modulated else (None, None)
    cot = rng.standard_normal((b, n, d)).astype(np.float32)
    args = (x, gamma, beta, shift, scale)
    live = tuple(i for i, a in enumerate(args) if a is not None)

    def loss(norm):
        return lambda *a: jnp.sum(norm(a[0], 1e-6, *a[1:]) * cot)

    got = jit(jax.value_and_grad(loss(um.layer_norm), argnums=live))(*args)
    want = jit(jax.value_and_grad(loss(_composed_norm), argnums=live))(*args)
    assert_close(um.layer_norm(*args[:1], 1e-6, *args[1:]), _composed_norm(args[0], 1e-6, *args[1:]), 1e-5, 1e-5)
    assert_close(got[0], want[0], 1e-4, 1e-3)
    for g, w in zip(got[1], want[1]):
        assert g.shape == w.shape
        assert_close(g, w, 1e-4, 1e-4)


def test_layer_norm_gradients_keep_input_dtypes_and_leading_axes():
    rng = np.random.default_rng(3)
    # No modulation: any number of leading axes; the affine gradients sum over all of them.
    x = jnp.asarray(rng.standard_normal((2, 3, 4, 8)), jnp.bfloat16)
    gamma, beta = jnp.ones(8, jnp.float32), jnp.zeros(8, jnp.float32)
    y, vjp = jax.vjp(lambda x, g, b: um.layer_norm(x, 1e-6, g, b), x, gamma, beta)
    assert y.dtype == jnp.bfloat16
    dx, dg, db = vjp(jnp.ones_like(y))
    assert (dx.dtype, dg.dtype, db.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
    assert_close(db, np.full(8, 2 * 3 * 4), 0, 0)  # d beta = sum of the ones cotangent
    # (1 + scale) and shift per example: the shift gradient is the token sum of g.
    xm = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    sh = sc = jnp.zeros((2, 8), jnp.bfloat16)
    y, vjp = jax.vjp(lambda s, c: um.layer_norm(xm, 1e-6, None, None, s, c), sh, sc)
    d_shift, d_scale = vjp(jnp.ones_like(y))
    assert d_shift.dtype == d_scale.dtype == jnp.bfloat16
    assert_close(d_shift.astype(jnp.float32), np.full((2, 8), 5.0), 0, 0)


def test_layer_norm_rejects_half_or_misshaped_modulation():
    x = jnp.zeros((2, 5, 8))
    with pytest.raises(ValueError, match="both shift and scale"):
        um.layer_norm(x, 1e-6, shift=jnp.zeros((2, 8)))
    with pytest.raises(ValueError, match=r"shift, scale \(B, D\)"):
        um.layer_norm(x, 1e-6, shift=jnp.zeros((2, 5)), scale=jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"x \(B, N, D\)"):
        um.layer_norm(jnp.zeros((2, 8)), 1e-6, shift=jnp.zeros((2, 8)), scale=jnp.zeros((2, 8)))


def test_layer_norm_module_modulates_like_modulate():
    f = hk.without_apply_rng(hk.transform(lambda x, s, c: um.LayerNorm(True, 1e-6)(x, s, c)))
    g = hk.without_apply_rng(hk.transform(lambda x, s, c: um.modulate(um.LayerNorm(True, 1e-6)(x), s, c)))
    rng = np.random.default_rng(4)
    x, s, c = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((2, 5, 8), (2, 8), (2, 8)))
    params = {"layer_norm": {"scale": jnp.linspace(0.5, 1.5, 8), "offset": jnp.linspace(-1, 1, 8)}}
    assert jax.tree.structure(f.init(None, x, s, c)) == jax.tree.structure(params)
    assert_close(f.apply(params, x, s, c), g.apply(params, x, s, c), 1e-5, 1e-5)


def np_rel_index(g):
    idx = np.zeros((g * g, g * g), np.int64)
    for i in range(g * g):
        for j in range(g * g):
            dr, dc = i // g - j // g, i % g - j % g
            idx[i, j] = (dr + g - 1) * (2 * g - 1) + (dc + g - 1)
    return idx


@settings(max_examples=6, deadline=None)
@given(g=st.integers(1, 6))
def test_rel_pos_index(g):
    idx = um.rel_pos_index(g)
    np.testing.assert_array_equal(idx, np_rel_index(g))
    assert idx.min() >= 0 and idx.max() < (2 * g - 1) ** 2
    # Same offset <=> same entry; the diagonal is the zero offset (table centre).
    assert (np.diag(idx) == (2 * g - 1) ** 2 // 2).all()


@pytest.mark.parametrize("g, extra, k, seed", [(2, 0, 3, 0), (3, 2, 5, 1), (4, 1, 16, 2)])
def test_bias_index_gathers_kept_pairs(g, extra, k, seed):
    rng = np.random.default_rng(seed)
    L = g * g
    ids_keep = np.stack([rng.permutation(L)[:k] for _ in range(2)]).astype(np.int32)
    got = np.asarray(jit(um.bias_index, static_argnums=(0, 1))(g, extra, jnp.asarray(ids_keep)))
    full = np_rel_index(g)
    zero_row = (2 * g - 1) ** 2
    assert got.shape == (2, extra + k, extra + k)
    for b in range(2):
        assert (got[b, :extra, :] == zero_row).all() and (got[b, :, :extra] == zero_row).all()
        np.testing.assert_array_equal(got[b, extra:, extra:], full[np.ix_(ids_keep[b], ids_keep[b])])
    whole = np.asarray(um.bias_index(g, extra))
    assert whole.shape == (1, extra + L, extra + L)
    np.testing.assert_array_equal(whole[0, extra:, extra:], full)


@pytest.mark.parametrize("rel", [False, True])
def test_attention_matches_numpy(rel):
    g, heads, w, extra = 3, 2, 8, 1
    ids_keep = jnp.asarray([[4, 0, 8, 2, 5], [1, 7, 3, 6, 0]], jnp.int32)
    n = extra + ids_keep.shape[1]
    index = um.bias_index(g, extra, ids_keep) if rel else None

    def fn(x, index):
        return um.Attention(heads, g if rel else None)(x, index)

    f = hk.without_apply_rng(hk.transform(fn))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, n, w)), jnp.float32)
    params = random_like(jax.eval_shape(f.init, jax.random.key(1), x, index), seed=2)
    y = jit(f.apply)(params, x, index)
    pn = {k.split("/")[-1]: {kk: np.asarray(v, np.float64) for kk, v in d.items()} for k, d in params.items()}
    bias = None
    if rel:
        table = np.concatenate([pn["attn"]["rel_pos_bias"], np.zeros((1, heads))])
        bias = table[np.asarray(index)].transpose(0, 3, 1, 2)
        assert pn["attn"]["rel_pos_bias"].shape == ((2 * g - 1) ** 2, heads)
    assert_close(y, np_attention(np.asarray(x, np.float64), pn, heads, bias), rtol=1e-4, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=3), fan_in=st.integers(1, 6),
       fan_out=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_dense_is_linear_on_any_leading_axes(lead, fan_in, fan_out, seed):
    """Dense has hk.Linear's parameters and computes x @ w + b over the last axis for any
    number of leading axes; its gradients are those of that formula (numpy, float64)."""
    shape = (*lead, fan_in)
    f = hk.without_apply_rng(hk.transform(lambda x: um.Dense(fan_out, name="fc")(x)))
    lin = hk.without_apply_rng(hk.transform(lambda x: hk.Linear(fan_out, name="fc")(x)))
    x = jnp.zeros(shape, jnp.float32)
    assert jax.eval_shape(f.init, jax.random.key(0), x) == jax.eval_shape(lin.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)
    params = random_like(jax.eval_shape(f.init, jax.random.key(0), x), seed=seed)
    x = rng.standard_normal(shape)
    ct = rng.standard_normal((*lead, fan_out))
    y, vjp = jax.vjp(f.apply, params, jnp.asarray(x, jnp.float32))
    (dp, dx) = vjp(jnp.asarray(ct, jnp.float32))
    w, b = (np.asarray(params["fc"][k], np.float64) for k in ("w", "b"))
    x2, ct2 = x.reshape(-1, fan_in), ct.reshape(-1, fan_out)
    assert y.shape == (*lead, fan_out)
    assert_close(y, x @ w + b, rtol=1e-5, atol=1e-5)
    assert_close(dx, ct @ w.T, rtol=1e-5, atol=1e-5)
    assert_close(dp["fc"]["w"], x2.T @ ct2, rtol=1e-5, atol=1e-5)
    assert_close(dp["fc"]["b"], ct2.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rel", [None, "kept", "all"])
def test_attention_gradients_match_reference(rel):
    """Gradients (params and input) equal those of the textbook formulation: Dense(3W),
    reshape to (B, N, H, D), jax.nn.dot_product_attention, Dense(W). The module computes
    the same function heads-major with the softmax normalised after the PV matmul.
    ``rel``: no bias; a per-example bias of kept tokens (B, N, N); one bias shared by
    the batch (1, N, N), whose gradient has its own backward rule."""
    g, heads, w, extra = 3, 2, 8, 1
    ids_keep = jnp.asarray([[4, 0, 8, 2, 5], [1, 7, 3, 6, 0]], jnp.int32)
    if rel == "all":
        ids_keep = jnp.tile(jnp.arange(g * g, dtype=jnp.int32), (2, 1))
    n = extra + ids_keep.shape[1]
    index = {None: None, "kept": um.bias_index(g, extra, ids_keep), "all": um.bias_index(g, extra)}[rel]
    f = hk.without_apply_rng(hk.transform(lambda x, i: um.Attention(heads, g if rel else None)(x, i)))
    if rel == "all":
        assert index.shape == (1, n, n)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, n, w)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((2, n, w)), jnp.float32)
    params = random_like(jax.eval_shape(f.init, jax.random.key(1), x, index), seed=4)

    def reference(params, x):
        p = {k.split("/")[-1]: v for k, v in params.items()}
        qkv = (x @ p["qkv"]["w"] + p["qkv"]["b"]).reshape(2, n, 3, heads, w // heads)
        bias = None
        if rel:
            table = jnp.concatenate([params["attn"]["rel_pos_bias"], jnp.zeros((1, heads))])
            bias = jnp.moveaxis(table[index], -1, 1)
        out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], bias=bias)
        return out.reshape(2, n, w) @ p["proj"]["w"] + p["proj"]["b"]

    def grads(fn):
        return jit(jax.grad(lambda p, x: jnp.sum(fn(p, x) * ct), argnums=(0, 1)))(params, x)

    got = grads(lambda p, x: f.apply(p, x, index))
    want = grads(reference)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert float(jnp.abs(b).max()) > 0  # every gradient is exercised
        assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rel", [None, "kept", "all"])
@pytest.mark.parametrize("heads, groups", [(3, 2), (4, 2), (4, 3), (4, 4), (2, 5)])
def test_attention_head_groups_compute_the_same_function(heads, groups, rel):
    """Splitting the heads into independent groups (uneven splits and more groups than
    heads included) changes neither the parameters nor the output nor any gradient,
    without a bias, with per-example and with batch-shared relative position bias."""
    g, w, extra = 3, 4 * heads, 1
    ids_keep = jnp.asarray([[4, 0, 8, 2, 5], [1, 7, 3, 6, 0]], jnp.int32)
    if rel == "all":
        ids_keep = jnp.tile(jnp.arange(g * g, dtype=jnp.int32), (2, 1))
    n = extra + ids_keep.shape[1]
    index = {None: None, "kept": um.bias_index(g, extra, ids_keep), "all": um.bias_index(g, extra)}[rel]

    def make(k):
        return hk.without_apply_rng(hk.transform(
            lambda x, i: um.Attention(heads, g if rel else None, head_groups=k)(x, i)))

    one, split = make(1), make(groups)
    rng = np.random.default_rng(heads * 10 + groups)
    x = jnp.asarray(rng.standard_normal((2, n, w)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((2, n, w)), jnp.float32)
    shapes = jax.eval_shape(one.init, jax.random.key(0), x, index)
    assert jax.eval_shape(split.init, jax.random.key(0), x, index) == shapes
    params = random_like(shapes, seed=5)

    def value_and_grads(f):
        loss = lambda p, x: jnp.sum(f.apply(p, x, index) * ct)
        return jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    (v1, g1), (v2, g2) = value_and_grads(one), value_and_grads(split)
    assert_close(v2, v1, rtol=1e-5, atol=1e-5)
    assert_close(jit(split.apply)(params, x, index), jit(one.apply)(params, x, index), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
        assert float(jnp.abs(b).max()) > 0
        assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_attention_head_groups_validated_and_defaulted():
    f = hk.transform(lambda x: um.Attention(2, head_groups=0)(x))
    with pytest.raises(ValueError, match="head_groups: expected >= 1, got 0"):
        f.init(jax.random.key(0), jnp.zeros((1, 3, 4)))
    # This suite runs on CPU, where the heads are split in two (see attention.py).
    assert jax.default_backend() != "cpu" or um.default_head_groups() == 2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("b, rest", [(1, (6, 5)), (4, (6, 5)), (33, (6, 5)), (3, (2, 4, 4))])
def test_add_batch_shared_value_and_gradients(b, rest, dtype):
    """add_batch_shared is x + shared[None] (value and both gradients, including the
    shared tensor's sum over the batch that it computes as a matmul)."""
    rng = np.random.default_rng(b)
    x = jnp.asarray(rng.standard_normal((b, *rest)), dtype)
    pos = jnp.asarray(rng.standard_normal(rest), dtype)
    ct = rng.standard_normal((b, *rest))
    y, vjp = jax.vjp(jit(um.add_batch_shared), x, pos)
    gx, gpos = vjp(jnp.asarray(ct, dtype))
    assert y.dtype == gx.dtype == gpos.dtype == dtype
    tol = 1e-6 if dtype == jnp.float32 else 3e-2
    assert_close(y, np.asarray(x, np.float64) + np.asarray(pos, np.float64)[None], rtol=tol, atol=tol)
    assert_close(gx, np.asarray(jnp.asarray(ct, dtype), np.float64), rtol=tol, atol=tol)
    assert_close(gpos, np.asarray(jnp.asarray(ct, dtype), np.float64).sum(0), rtol=tol, atol=tol * b)


@pytest.mark.parametrize("shared_shape", [(5,), (1, 5), (6, 1), (2, 6, 5)])
def test_add_batch_shared_rejects_broadcasting(shared_shape):
    """Its gradient sums over the batch axis only, so a shared tensor that would
    broadcast (and need its gradient summed over more axes) is refused up front."""
    with pytest.raises(ValueError, match=r"add_batch_shared: shared has shape .* expected one example's shape \(6, 5\)"):
        um.add_batch_shared(jnp.zeros((3, 6, 5)), jnp.zeros(shared_shape))


def _embed_params(kind):
    f = hk.transform(lambda: um.position_embedding(kind, 16, 8, jnp.float32))
    params = jit(f.init)(jax.random.key(0))
    return params, jit(f.apply)(params, None)


def test_position_embedding_kinds():
    params, table = _embed_params("sincos_frozen")
    assert params == {}  # a constant, never a parameter
    np.testing.assert_allclose(table, um.sincos_2d(8, 16), atol=1e-7)
    params, table = _embed_params("sincos_learned")
    np.testing.assert_allclose(params["~"]["pos_embed"], um.sincos_2d(8, 16), atol=1e-7)
    params, table = _embed_params("learned")
    # UMD init N(0, 1/sqrt(gh*gw)): 256 tokens -> std 1/16.
    assert table.shape == (256, 8) and abs(float(jnp.std(table)) - 1 / 16) < 0.1 / 16
    assert _embed_params("none")[1] is None


def test_label_embedding_null_row_and_unconditional():
    def fn(t, labels, classes):
        return um.conditioning(t, labels, width=8, num_classes=classes, freq_dim=8,
                               freq_order="sin_cos", max_period=10000.0, dtype=jnp.float32)

    f = hk.without_apply_rng(hk.transform(lambda t, y: fn(t, y, 4)))
    t = jnp.array([0, 7])
    params = random_like(jax.eval_shape(f.init, jax.random.key(0), t, None))
    assert params["label_embed"]["embeddings"].shape == (5, 8)  # num_classes + 1 rows
    apply = jit(f.apply)
    assert_close(apply(params, t, None), apply(params, t, jnp.array([4, 4])), 0, 0)
    assert not np.allclose(apply(params, t, None), apply(params, t, jnp.array([1, 2])))
    u = hk.without_apply_rng(hk.transform(lambda t, y: fn(t, y, 0)))
    pu = random_like(jax.eval_shape(u.init, jax.random.key(0), t, None))
    assert "label_embed" not in pu
    assert_close(jit(u.apply)(pu, t, jnp.array([1, 2])), jit(u.apply)(pu, t, None), 0, 0)


def test_drop_labels():
    y = jnp.arange(6) % 3
    key = jax.random.key(0)
    drop = jit(um.drop_labels, static_argnums=(2, 3))
    np.testing.assert_array_equal(drop(key, y, 0.0, 3), y)
    np.testing.assert_array_equal(drop(key, y, 1.0, 3), jnp.full(6, 3))
    big = drop(key, jnp.zeros(20000, jnp.int32), 0.1, 3)
    assert abs(float(jnp.mean(big == 3)) - 0.1) < 0.01


_SHARD_MAP_GRADS = r"""
import functools
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from unidiff.models.layers import add_batch_shared, layer_norm, modulate
D = 4  # devices
mesh = jax.make_mesh((D,), ("data",))
rng = np.random.default_rng(0)
b, n, w = 2, 5, 6  # per device
x = rng.normal(1.0, 2.0, (D * b, n, w)).astype(np.float32)
ct = rng.normal(size=(D * b, n, w)).astype(np.float32)
table = rng.normal(size=(n, w)).astype(np.float32)
gamma, beta = 1 + 0.3 * rng.normal(size=w).astype(np.float32), 0.3 * rng.normal(size=w).astype(np.float32)
shift_local, scale_local = (0.3 * rng.normal(size=(b, w)).astype(np.float32) for _ in range(2))

def composed(x, gamma, beta, shift, scale):
    mean = jnp.mean(x, -1, keepdims=True)
    y = (x - mean) / jnp.sqrt(jnp.mean((x - mean) ** 2, -1, keepdims=True) + 1e-6) * gamma + beta
    return modulate(y, shift, scale)

def per_device(f, specs):
    # The gradient of sum(f(...) * ct) over the global batch, inside shard_map.
    loss = lambda *a: jax.lax.psum(jnp.sum(f(*a[:-1]) * a[-1]), "data")
    g = jax.shard_map(jax.grad(loss, argnums=tuple(range(len(specs)))), mesh=mesh,
                      in_specs=(*specs, P("data")), out_specs=specs)
    return jax.jit(g)

def put(a, spec):
    return jax.device_put(a, NamedSharding(mesh, spec))

def err(got, want):
    return max(float(np.max(np.abs(np.asarray(g) - np.asarray(v)) / (1 + np.abs(np.asarray(v))))) for g, v in zip(got, want))

out = {}
# add_batch_shared with a replicated table (a frozen sin-cos table, an uncast parameter).
specs = (P("data"), P())
got = per_device(add_batch_shared, specs)(put(x, specs[0]), put(table, P()), put(ct, P("data")))
want = jax.grad(lambda x, t: jnp.sum((x + t[None]) * ct), argnums=(0, 1))(x, table)
out["add_batch_shared"] = err(got, want)
# layer_norm, affine and modulation replicated: their gradient is the sum over devices.
tile = lambda a: np.tile(a, (D, 1))
specs = (P("data"), P(), P(), P(), P())
got = per_device(lambda *a: layer_norm(a[0], 1e-6, *a[1:]), specs)(
    put(x, P("data")), *(put(a, P()) for a in (gamma, beta, shift_local, scale_local)), put(ct, P("data")))
full = jax.grad(lambda *a: jnp.sum(composed(*a) * ct), argnums=(0, 1, 2, 3, 4))(x, gamma, beta, tile(shift_local), tile(scale_local))
fold = lambda g: np.asarray(g).reshape(D, b, w).sum(0)
out["layer_norm_replicated"] = err(got, (full[0], full[1], full[2], fold(full[3]), fold(full[4])))
# layer_norm with per-example modulation (as in the blocks) and replicated affine.
specs = (P("data"), P(), P(), P("data"), P("data"))
shift, scale = tile(shift_local) * 1.5, tile(scale_local) - 0.2
got = per_device(lambda *a: layer_norm(a[0], 1e-6, *a[1:]), specs)(
    put(x, P("data")), put(gamma, P()), put(beta, P()), put(shift, P("data")), put(scale, P("data")), put(ct, P("data")))
out["layer_norm_per_example_modulation"] = err(got, jax.grad(
    lambda *a: jnp.sum(composed(*a) * ct), argnums=(0, 1, 2, 3, 4))(x, gamma, beta, shift, scale))
print(json.dumps(out))
"""


def test_hand_written_gradients_inside_shard_map_sum_replicated_inputs_over_devices():
    """Inside ``jax.shard_map`` (4 simulated devices), a replicated input of
    add_batch_shared or layer_norm (a frozen position table, the affine parameters, a
    shared modulation) gets the gradient over the global batch, the sum of every
    device's, as autodiff of the plain composition gives it; a per-device input its own
    device's. JAX rejected the hand-written gradients there before (per-device cotangent
    for a replicated input)."""
    env = child_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": str(ROOT)})
    proc = subprocess.run([sys.executable, "-c", _SHARD_MAP_GRADS], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(errors) == {"add_batch_shared", "layer_norm_replicated", "layer_norm_per_example_modulation"}
    for case, e in errors.items():
        assert e < 1e-4, (case, e)


def _dot_operand_dtypes(lowered_text: str) -> list[tuple[str, str]]:
    return re.findall(r"stablehlo.dot_general .*?: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)",
                      lowered_text)


@pytest.mark.parametrize("rel", [None, "all"])
def test_bfloat16_attention_backward_runs_bfloat16_matmuls(rel):
    """The attention matmuls give float32 logits and outputs (the softmax runs in float32),
    and under plain autodiff their float32 cotangents made all four backward matmuls
    float32: a third of a bfloat16 UMD step's matmuls. The cotangents are now cast to
    the operands' dtype first, as for every other bfloat16 layer: forward values are
    unchanged, gradients are as close to a float32 computation as autodiff's were, and no
    float32 matmul is left in the layer's backward pass."""
    from unidiff.models import attention as att

    heads, w, g, n = 2, 8, 3, 10
    index = um.bias_index(g, 1) if rel else None
    f = hk.without_apply_rng(hk.transform(lambda x, i: um.Attention(heads, g if rel else None)(x, i)))
    rng = np.random.default_rng(7)
    x32 = jnp.asarray(rng.standard_normal((2, n, w)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((2, n, w)), jnp.bfloat16)
    p32 = random_like(jax.eval_shape(f.init, jax.random.key(1), x32, index), seed=8)
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p32)
    x16 = x32.astype(jnp.bfloat16)
    loss = lambda p, x: jnp.sum(f.apply(p, x, index).astype(jnp.float32) * ct.astype(jnp.float32))
    grad = jit(jax.grad(loss, argnums=(0, 1)))
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(p16, x16).as_text()
    dots = _dot_operand_dtypes(text)
    # Float32 only where the float32 bias's batch-summed gradient is a matmul with a ones
    # vector (add_batch_shared): one per head group.
    groups = min(heads, um.default_head_groups())
    assert dots.count(("f32", "f32")) == (groups if rel else 0), dots
    assert dots.count(("bf16", "bf16")) > 0

    # The core, against plain autodiff (float32 backward) and a float32 reference.
    q, k, v = (jnp.asarray(rng.standard_normal((2, heads, n, w // heads)), jnp.bfloat16) for _ in range(3))
    c = jnp.asarray(rng.standard_normal((2, heads, n, w // heads)), jnp.float32)

    def core(qk, pv, q, k, v):
        logits = qk(q, k)
        e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
        return jnp.sum(pv(e.astype(v.dtype), v) / e.sum(-1, keepdims=True) * c)

    new = jit(jax.value_and_grad(functools.partial(core, att._qk_low, att._pv_low), argnums=(0, 1, 2)))
    old = jit(jax.value_and_grad(functools.partial(core, att._qk, att._pv), argnums=(0, 1, 2)))
    (v_new, g_new), (v_old, g_old) = new(q, k, v), old(q, k, v)
    assert v_new == v_old  # the forward pass is the same computation
    ref = jax.grad(functools.partial(core, att._qk, att._pv), argnums=(0, 1, 2))(
        *(a.astype(jnp.float32) for a in (q, k, v)))
    for a, b, r in zip(g_new, g_old, ref):
        assert a.dtype == jnp.bfloat16
        err_new = float(jnp.abs(a.astype(jnp.float32) - r).max())
        err_old = float(jnp.abs(b.astype(jnp.float32) - r).max())
        scale = float(jnp.abs(r).max())
        assert err_new <= 2 * err_old + 1e-2 * scale, (err_new, err_old, scale)
    # The whole layer in bfloat16 against float32.
    g16, g32 = grad(p16, x16), jit(jax.grad(loss, argnums=(0, 1)))(p32, x32)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
        assert float(jnp.abs(a.astype(jnp.float32) - b).max()) <= 5e-2 * float(jnp.abs(b).max()) + 1e-3
