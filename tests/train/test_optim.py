"""Optimizer pieces: decay mask, LR schedule against its closed form, clipping."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from unidiff.train.optim import OptimConfig, decay_mask, lr_schedule, make_optimizer


def test_decay_mask_skips_biases_norms_and_tokens():
    params = {
        "encoder": {
            "cls_tokens": jnp.zeros((4, 8)),
            "block_0/attn/qkv": {"w": jnp.zeros((8, 24)), "b": jnp.zeros((24,))},
            "norm": {"scale": jnp.zeros((8,)), "offset": jnp.zeros((8,))},
            "pos_embed": jnp.zeros((16, 8)),
        },
        "decoder": {"mask_token": jnp.zeros((8,)), "head": {"w": jnp.zeros((8, 4))}},
    }
    mask = decay_mask(params)
    assert mask["encoder"]["cls_tokens"] is False
    assert mask["encoder"]["block_0/attn/qkv"] == {"w": True, "b": False}
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
