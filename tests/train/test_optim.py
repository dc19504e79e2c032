"""Optimizer pieces: decay mask, LR schedule against its closed form, clipping."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings, strategies as st

from unidiff.train.optim import (
    OptimConfig,
    clip_by_global_norm,
    decay_mask,
    global_norm,
    lr_schedule,
    make_optimizer,
)


def test_decay_mask_skips_biases_norms_and_tokens():
    """Decayed: rank >= 2 weights and the learned position tables; not: biases (the
    relative position bias table too), norm parameters, CLS and mask tokens."""
    params = {
        "encoder": {
            "cls_tokens": jnp.zeros((4, 8)),
            "block_0/attn/qkv": {"w": jnp.zeros((8, 24)), "b": jnp.zeros((24,))},
            "block_0/attn": {"rel_pos_bias": jnp.zeros((49, 2))},  # MDT's, rank 2 but a bias
            "norm": {"scale": jnp.zeros((8,)), "offset": jnp.zeros((8,))},
            "pos_embed": jnp.zeros((16, 8)),
        },
        "decoder": {"mask_token": jnp.zeros((8,)), "head": {"w": jnp.zeros((8, 4))}},
    }
    mask = decay_mask(params)
    assert mask["encoder"]["cls_tokens"] is False
    assert mask["encoder"]["block_0/attn/qkv"] == {"w": True, "b": False}
    assert mask["encoder"]["block_0/attn"] == {"rel_pos_bias": False}
    assert mask["encoder"]["norm"] == {"scale": False, "offset": False}
    assert mask["encoder"]["pos_embed"] is True
    assert mask["decoder"] == {"mask_token": False, "head": {"w": True}}


@settings(max_examples=20, deadline=None)
@given(
    base_lr=st.floats(1e-5, 1e-2), batch=st.integers(1, 4096),
    warmup=st.integers(1, 50), extra=st.integers(1, 200), frac=st.floats(0, 1),
)
def test_lr_schedule_matches_closed_form(base_lr, batch, warmup, extra, frac):
    cfg = OptimConfig(base_lr=base_lr, batch_size=batch, warmup_steps=warmup,
                      total_steps=warmup + extra, min_lr=0.0)
    peak = base_lr * batch / 256
    sched = lr_schedule(cfg)
    step = int(frac * (warmup + extra))
    if step < warmup:
        expected = peak * step / warmup
    else:
        expected = 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / extra))
    # float32 evaluation: near the end of the cosine, 1 + cos(.) cancels, so the error is
    # a few ulps of the peak, not of the (tiny) value itself.
    np.testing.assert_allclose(float(sched(step)), expected, rtol=1e-4, atol=1e-6 * peak)


def test_weight_decay_only_touches_decayed_params():
    # With zero gradients, AdamW's only update is decay: masked leaves must not move.
    cfg = OptimConfig(base_lr=0.1, batch_size=256, warmup_steps=0, total_steps=10,
                      weight_decay=0.5)
    opt = make_optimizer(cfg)
    params = {"w": jnp.ones((3, 3)), "b": jnp.ones((3,)), "cls_tokens": jnp.ones((2, 3))}
    state = opt.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(grads, state, params)
    assert float(jnp.abs(updates["w"]).max()) > 0
    assert float(jnp.abs(updates["b"]).max()) == 0
    assert float(jnp.abs(updates["cls_tokens"]).max()) == 0


def _grads(seed: int, scale: float):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(scale * rng.standard_normal((5, 7)), jnp.float32),
            "b": jnp.asarray(scale * rng.standard_normal((7,)), jnp.float32)}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e2), max_norm=st.floats(0.1, 10.0),
       pass_norm=st.booleans())
def test_clip_matches_optax_with_or_without_the_norm(seed, scale, max_norm, pass_norm):
    grads = _grads(seed, scale)
    ref, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    norm = {"grad_norm": optax.tree.norm(grads)} if pass_norm else {}
    clip = clip_by_global_norm(max_norm)
    out, state = clip.update(grads, clip.init(grads), None, **norm)
    assert state == optax.EmptyState()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out, ref)
    # Independent check: the clipped global norm is min(norm, max_norm).
    expected = min(float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))), max_norm)
    np.testing.assert_allclose(float(optax.tree.norm(out)), expected, rtol=1e-5)


def test_clip_uses_the_given_norm_instead_of_recomputing_it():
    grads = _grads(0, 1.0)
    true = float(optax.tree.norm(grads))
    clip = clip_by_global_norm(max_norm=true / 2)
    # A (wrong) norm of 4x the true one must scale by max_norm / given = 1/8: proof that
    # the given value is used.
    out, _ = clip.update(grads, clip.init(grads), None, grad_norm=4 * true)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b / 8, rtol=1e-6), out, grads)
    # Below the threshold nothing changes.
    out, _ = clip.update(grads, clip.init(grads), None, grad_norm=true / 4)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), out, grads)


def test_make_optimizer_equals_the_optax_chain_and_keeps_its_state_tree():
    cfg = OptimConfig(base_lr=1e-2, batch_size=256, warmup_steps=0, total_steps=10, grad_clip=0.5)
    ours = make_optimizer(cfg)
    ref = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                      optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2,
                                  weight_decay=cfg.weight_decay, mask=decay_mask))
    params = {"w": jnp.ones((5, 7)), "b": jnp.ones((7,))}
    s_ours, s_ref = ours.init(params), ref.init(params)
    # Same state tree, so checkpoints written before this optimizer restore into it.
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_ref)
    for seed in range(3):
        grads = _grads(seed, 3.0)  # norm well above grad_clip: clipping is active
        u_ours, s_ours = ours.update(grads, s_ours, params, grad_norm=optax.tree.norm(grads))
        u_ref, s_ref = ref.update(grads, s_ref, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), u_ours, u_ref)
        params = optax.apply_updates(params, u_ours)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1),
       sizes=st.lists(st.sampled_from([1, 7, 384, 4096, 4097, 9000]), min_size=0, max_size=8),
       bf16=st.booleans())
def test_global_norm_matches_numpy(seed, sizes, bf16):
    # Leaves on both sides of the small-leaf threshold, so both code paths are summed.
    rng = np.random.default_rng(seed)
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    tree = {f"leaf{i}": jnp.asarray(rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3), dtype)
            for i, n in enumerate(sizes)}
    expected = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in tree.values()))
    got = global_norm(tree)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
