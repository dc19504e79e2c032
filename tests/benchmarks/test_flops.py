"""The analytic FLOP model: hand-computed values, an independent count from the model's
own jaxpr, and the paper's UMD/DiT prediction.

The jaxpr check is the strongest: it traces ``Model.apply`` (no compilation) and sums
2 * (output size) * (contracted size) over every ``dot_general`` the forward really
executes, so any token the model computes on that the FLOP model forgets (or the
reverse) fails it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import unidiff.models as um
from unidiff import flops
from unidiff.corruption import recipes
from unidiff.corruption.masking import no_masking, num_kept
from unidiff.train.config import TrainConfig
from unidiff.train.loop import model_config_for


# ---------------------------------------------------------------------------------------
# Hand-computed values for a tiny config
# ---------------------------------------------------------------------------------------
# width 8, 2 encoder blocks, 1 decoder block, MLP ratio 2 (hidden 16), 8x8 images with
# patch 4 and 1 channel: L = 4 tokens, P = 16 values per token, 1 CLS token, frequency
# features = width = 8, output x0 + eps -> O = 16 * 2 = 32 values per token.
TINY = dict(image_size=8, patch_size=4, in_channels=1, width=8, depth=2, num_heads=2,
            decoder_depth=1, mlp_ratio=2.0, num_cls_tokens=1)


def _tiny():
    return um.ModelConfig(**TINY)


# One AdaLN block on n tokens of width 8, per example:
#   qkv 2*n*8*24 + scores 2*n*n*8 + values 2*n*n*8 + proj 2*n*8*8 + MLP 2*n*8*16*2
#   + AdaLN Dense(8 -> 48) 2*8*48.
BLOCK_N5 = 2 * 5 * 8 * 24 + 2 * 5 * 5 * 8 * 2 + 2 * 5 * 8 * 8 + 2 * 5 * 8 * 16 * 2 + 2 * 8 * 48  # 6688
BLOCK_N3 = 2 * 3 * 8 * 24 + 2 * 3 * 3 * 8 * 2 + 2 * 3 * 8 * 8 + 2 * 3 * 8 * 16 * 2 + 2 * 8 * 48  # 4128
BLOCK_N2 = 2 * 2 * 8 * 24 + 2 * 2 * 2 * 8 * 2 + 2 * 2 * 8 * 8 + 2 * 2 * 8 * 16 * 2 + 2 * 8 * 48  # 2944
TIME = 2 * 8 * 8 + 2 * 8 * 8  # sinusoid(8) -> Dense(8) -> Dense(8)
FINAL = 2 * 4 * 8 * 32 + 2 * 8 * 16  # head on L = 4 tokens + AdaLN Dense(8 -> 16)
DECODER = 1 * BLOCK_N5  # decoder: L + 1 pooled CLS rep = 5 tokens


def test_hand_computed_unmasked_forward():
    # encoder on K = 4 tokens + 1 CLS = 5 tokens; patch embed 2*4*16*8.
    expected = TIME + 2 * 4 * 16 * 8 + 2 * BLOCK_N5 + DECODER + FINAL
    assert expected == 23648
    parts = flops.forward_flops(_tiny(), None)
    assert sum(parts[p] for p in flops.FORWARD_PARTS) == expected
    assert parts["side_interpolater"] == 0 and parts["decoder_embed"] == 0


def test_hand_computed_masked_forward():
    # K = 1 visible token (+1 CLS = 2 in the encoder); the decoder still sees all 4.
    expected = TIME + 2 * 1 * 16 * 8 + 2 * BLOCK_N2 + DECODER + FINAL
    assert expected == 15392
    parts = flops.forward_flops(_tiny(), 1)
    assert sum(parts[p] for p in flops.FORWARD_PARTS) == expected


def test_hand_computed_umd_and_dit_steps():
    cfg = _tiny()
    # UMD, batch 4: 2 clean rows keep int(4 * 0.25) = 1 token, 2 noisy rows keep
    # int(4 * 0.625) = 2 tokens; a step is 3 x forward.
    fwd_k1 = TIME + 2 * 1 * 16 * 8 + 2 * BLOCK_N2 + DECODER + FINAL
    fwd_k2 = TIME + 2 * 2 * 16 * 8 + 2 * BLOCK_N3 + DECODER + FINAL
    fwd_full = TIME + 2 * 4 * 16 * 8 + 2 * BLOCK_N5 + DECODER + FINAL
    umd = flops.train_step_flops(cfg, recipes.umd(), 4)
    assert umd["total"] == 3 * (2 * fwd_k1 + 2 * fwd_k2) == 200448
    assert umd["backward"] == 2 * umd["forward"]
    assert {k: (v["rows"], v["encoder_tokens"]) for k, v in umd["branches"].items()} == {
        "clean": (2, 2), "noisy": (2, 3)}
    dit = flops.train_step_flops(cfg, recipes.dit(), 4)
    assert dit["total"] == 3 * 4 * fwd_full == 283776
    assert flops.flops_ratio(cfg, recipes.umd(), recipes.dit(), 4) == pytest.approx(200448 / 283776)
    # The parts add up to the total.
    assert sum(umd["parts"][p] for p in flops.FORWARD_PARTS) == umd["total"]


def test_hand_computed_mae_mode_and_decoder_projection():
    # MAE mode (no AdaLN): conditioning is an extra token in the encoder (K + 1 CLS + 1)
    # and in the decoder (L + rep + cond); decoder width 4 behind Dense(8 -> 4).
    cfg = um.ModelConfig(**dict(TINY, adaln=False, decoder_width=4, decoder_heads=1))
    k = 1
    enc_n = k + 2
    enc_block = 2 * enc_n * 8 * 24 + 4 * enc_n * enc_n * 8 + 2 * enc_n * 8 * 8 + 2 * enc_n * 8 * 16 * 2
    dec_n = 4 + 2
    # decoder MLP hidden = int(4 * 2.0) = 8
    dec_block = 2 * dec_n * 4 * 12 + 4 * dec_n * dec_n * 4 + 2 * dec_n * 4 * 4 + 2 * dec_n * 4 * 8 * 2
    embed = 2 * (k + 2) * 8 * 4  # the K tokens and the 2 prepended extras
    final = 2 * 4 * 4 * 32  # no AdaLN in the head
    expected = TIME + 2 * k * 16 * 8 + 2 * enc_block + embed + dec_block + final
    parts = flops.forward_flops(cfg, k)
    assert sum(parts[p] for p in flops.FORWARD_PARTS) == expected


def test_side_interpolater_runs_only_on_masked_branches():
    cfg = um.ModelConfig(**dict(TINY, side_interpolater=True, decoder_pos_embed="none", num_cls_tokens=0))
    si = 2 * 4 * 8 * 24 + 4 * 4 * 4 * 8 + 2 * 4 * 8 * 8 + 2 * 4 * 8 * 16 * 2 + 2 * 8 * 48  # one block on L = 4
    assert flops.forward_flops(cfg, 2)["side_interpolater"] == si
    assert flops.forward_flops(cfg, None)["side_interpolater"] == 0
    # MDT two-pass: the noisy rows run twice (full + masked).
    step = flops.train_step_flops(cfg, recipes.mdt(), 4)
    assert list(step["branches"]) == ["full", "masked"]
    assert step["branches"]["masked"]["visible_tokens"] == num_kept(4, 0.3) == 2
    fwd = lambda k: sum(flops.forward_flops(cfg, k)[p] for p in flops.FORWARD_PARTS)  # noqa: E731
    assert step["total"] == 3 * 4 * (fwd(None) + fwd(2))


# ---------------------------------------------------------------------------------------
# Independent count from the model's jaxpr
# ---------------------------------------------------------------------------------------
def _jaxpr_dot_flops(jaxpr) -> int:
    """Sum of 2 * |output| * |contracted dims| over every dot_general, recursively."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2 * math.prod(out) * math.prod(lhs[d] for d in lc)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += _jaxpr_dot_flops(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += _jaxpr_dot_flops(sub)
    return total


def _traced_forward_flops(cfg: um.ModelConfig, batch: int, keep: int | None) -> int:
    model = um.Model(cfg)
    params = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((batch, cfg.num_tokens, cfg.patch_dim), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    if keep is None:
        return _jaxpr_dot_flops(jax.make_jaxpr(lambda p, x, t: model.apply(p, x, t))(params, x, t).jaxpr)
    full = no_masking(batch, cfg.num_tokens)
    # Any valid masking with K kept ids has the same shapes; the ids do not matter here.
    masking = full._replace(ids_keep=full.ids_keep[:, :keep],
                            mask=full.mask.at[:, keep:].set(1.0))
    fn = lambda p, x, t: model.apply(p, x, t, None, masking)  # noqa: E731
    return _jaxpr_dot_flops(jax.make_jaxpr(fn)(params, x, t).jaxpr)


SMALL = dict(width=16, num_heads=2, depth=2, decoder_depth=1)
JAXPR_CONFIGS = {
    "umd": lambda: um.umd_config("S/2", 8, 3, **SMALL),
    "umd_no_adaln": lambda: um.umd_config("S/2", 8, 3, adaln=False, **SMALL),
    "umd_labels": lambda: um.umd_config("S/2", 8, 3, num_classes=5, **SMALL),
    "mae": lambda: um.mae_config("S/2", 8, 3, decoder_width=8, decoder_heads=2, **dict(SMALL, decoder_depth=1)),
    "maskdit": lambda: um.maskdit_config("S/2", 8, 4, num_classes=5, decoder_width=8, decoder_heads=2, **SMALL),
    "mdt": lambda: um.mdt_config("N/2", 8, 4, num_classes=5, width=16, num_heads=2),
    "dit": lambda: um.dit_config("S/2", 8, 4, num_classes=5, width=16, num_heads=2, depth=2),
}


# DiT has no mask token: it never runs masked.
CASES = [(n, r) for n in sorted(JAXPR_CONFIGS) for r in (0.0, 0.75, 0.375) if n != "dit" or r == 0]


@pytest.mark.parametrize("name,ratio", CASES)
def test_forward_matches_the_models_own_matmuls(name, ratio):
    cfg = JAXPR_CONFIGS[name]()
    keep = None if ratio == 0 else num_kept(cfg.num_tokens, ratio)
    batch = 3
    traced = _traced_forward_flops(cfg, batch, keep)
    parts = flops.forward_flops(cfg, keep)
    assert batch * sum(parts[p] for p in flops.FORWARD_PARTS) == traced


@settings(max_examples=8, deadline=None)
@given(
    width_per_head=st.sampled_from([4, 8]), heads=st.integers(1, 3), depth=st.integers(0, 2),
    decoder_depth=st.integers(0, 2), cls=st.integers(0, 3), adaln=st.booleans(),
    grid=st.integers(2, 4), ratio=st.sampled_from([0.0, 0.25, 0.5, 0.75]),
)
def test_forward_matches_jaxpr_for_random_configs(width_per_head, heads, depth, decoder_depth, cls, adaln,
                                                  grid, ratio):
    width = width_per_head * heads * 2  # sin-cos needs width % 4 == 0 only when frozen; keep it even
    cfg = um.ModelConfig(image_size=2 * grid, patch_size=2, in_channels=3, width=width, depth=depth,
                         num_heads=heads, decoder_depth=decoder_depth, num_cls_tokens=cls, adaln=adaln)
    keep = None if ratio == 0 else num_kept(cfg.num_tokens, ratio)
    parts = flops.forward_flops(cfg, keep)
    assert 2 * sum(parts[p] for p in flops.FORWARD_PARTS) == _traced_forward_flops(cfg, 2, keep)


# ---------------------------------------------------------------------------------------
# The paper's prediction and the ordering of the recipes
# ---------------------------------------------------------------------------------------
def _arch(recipe: str, model: str = "B/4", size: int = 64):
    cfg = TrainConfig(workdir="-", recipe=recipe, model=model, train_steps=1)
    return model_config_for(cfg, size, 3, 0)


def test_umd_over_dit_for_b4_at_64_is_the_papers_058():
    # REFERENCE sec. 9: encoder 12 layers on 112 tokens on average + decoder 4 layers
    # on 256, vs 16 layers on 256, predicts 1.73x (0.578). Our count also has the 4
    # CLS tokens, the per-example AdaLN and the attention's N^2 terms: within 0.01.
    ratio = flops.flops_ratio(_arch("umd"), recipes.umd(), recipes.dit(), 256, config_b=_arch("dit"))
    print(f"UMD / DiT FLOPs, B/4 at 64x64, batch 256: {ratio:.4f} (1 / {1 / ratio:.3f})")
    assert ratio == pytest.approx(0.58, abs=0.01)
    # The paper's own back-of-envelope: (12 * 112 + 4 * 256) / (16 * 256).
    assert ratio == pytest.approx((12 * 112 + 4 * 256) / (16 * 256), abs=0.01)


@pytest.mark.parametrize("model,size", [("B/4", 64), ("S/4", 64), ("S/2", 32)])
def test_mae_cheaper_than_umd_cheaper_than_maskdit_and_dit(model, size):
    total = {r: flops.train_step_flops(_arch(r, model, size), recipes.get(r), 32)["total"]
             for r in ("mae", "umd", "maskdit", "dit")}
    assert total["mae"] < total["umd"] < total["maskdit"] < total["dit"]
    # Same ordering on one shared architecture.
    cfg = _arch("umd", model, size)
    same = {r: flops.train_step_flops(cfg, recipes.get(r), 32)["total"] for r in ("mae", "umd", "dit")}
    assert same["mae"] < same["umd"] < same["dit"]


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 64), r_t0=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
       m=st.sampled_from([0.0, 0.5, 0.75]))
def test_step_is_three_forwards_summed_over_branch_rows(batch, r_t0, m):
    cfg = _tiny()
    recipe = recipes.umd(r_t0=r_t0, m_t0=0.75, m_t=m)
    step = flops.train_step_flops(cfg, recipe, batch)
    rows = sum(v["rows"] for v in step["branches"].values())
    assert rows == batch
    fwd = sum(v["rows"] * v["forward_per_example"] for v in step["branches"].values())
    assert step["forward"] == fwd and step["total"] == 3 * fwd
    # Monotone in the mask ratio: hiding tokens never adds work.
    unmasked = flops.train_step_flops(cfg, recipes.umd(r_t0=r_t0, m_t0=0.75, m_t=0.0), batch)
    assert step["total"] <= unmasked["total"]


def test_bad_inputs_name_the_field():
    cfg = _tiny()
    with pytest.raises(ValueError, match="num_visible"):
        flops.forward_flops(cfg, 5)
    with pytest.raises(ValueError, match="config"):
        flops.forward_flops("B/4", None)
    with pytest.raises(ValueError, match="batch_size"):
        flops.train_step_flops(cfg, recipes.umd(), 0)
    # A numpy integer is an integer (forward_flops and split_batch took it already).
    assert flops.train_step_flops(cfg, recipes.umd(), np.int64(4)) == flops.train_step_flops(
        cfg, recipes.umd(), 4)
    with pytest.raises(ValueError, match="recipe"):
        flops.train_step_flops(cfg, "umd", 4)
    # Caught before use: a str has no num_tokens, and int() would truncate 2.9 to 2.
    with pytest.raises(ValueError, match="config: expected a ModelConfig, got str"):
        flops.train_step_flops("B/4", recipes.umd(), 4)
    with pytest.raises(ValueError, match="config: expected a ModelConfig"):
        flops.flops_ratio(cfg, recipes.umd(), recipes.dit(), 4, config_b="B/4")
    for bad in (2.9, 2.0, True, "2"):
        with pytest.raises(ValueError, match="num_visible"):
            flops.forward_flops(cfg, bad)
    assert flops.forward_flops(cfg, np.int64(2)) == flops.forward_flops(cfg, 2)
    assert np.isfinite(flops.flops_ratio(cfg, recipes.mae(), recipes.dit(), 8))
