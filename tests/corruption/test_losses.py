"""The UMD loss against independent numpy formulas, its gradients, and its errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from unidiff import corruption as uc
from unidiff.corruption import recipes

from .common import L, P, SCHEDULES, T, jit_loss, jit_loss_grad, jit_mix, make_batch

B = 8


def mixed(recipe, seed):
    keys, x0, labels = make_batch(seed, B)
    n_clean = uc.split_batch(B, recipe.r_t0)[0]
    branches = jit_mix(recipe, SCHEDULES[recipe.schedule], keys, x0, labels, num_clean=n_clean)
    return jax.device_get(branches)


def random_preds(branches, seed, scale=0.5):
    rng = np.random.default_rng(seed)
    return tuple(
        uc.Prediction(
            x0=(b.x0 + scale * rng.standard_normal(b.x0.shape)).astype(np.float32),
            eps=(b.eps + scale * rng.standard_normal(b.x0.shape)).astype(np.float32),
        )
        for b in branches
    )


# -- independent numpy versions ---------------------------------------------------------


def np_norm_pix(x):
    # MAE: mean and (unbiased, torch default) variance over each patch, eps 1e-6.
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, ddof=1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6)


def np_mae_loss(pred, target, mask, norm_pix):
    """MAE's loss: per-patch MSE, averaged over hidden patches (mask 1 = hidden)."""
    if norm_pix:
        target = np_norm_pix(target)
    per_patch = ((pred.astype(np.float64) - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def np_mse(a, b):
    return float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())


def np_umd(branches, preds, names, norm_pix=False):
    """UMD Eq. 4-6 written out per token (mask 1 = hidden)."""
    by = dict(zip(names, zip(branches, preds)))
    n0 = by["clean"][0].x0.shape[0] if "clean" in by else 0
    nn = by["noisy"][0].x0.shape[0] if "noisy" in by else 0
    total = 0.0
    if n0:
        b, p = by["clean"]
        total += n0 / (n0 + nn) * np_mae_loss(p.x0, b.x0, b.masking.mask, norm_pix)
    if nn:
        b, p = by["noisy"]
        if b.masking is None:
            eps_l = np_mse(p.eps, b.eps)
            x0_l = np_mse(p.x0, np_norm_pix(b.x0) if norm_pix else b.x0)
        else:
            hidden = b.masking.mask
            eps_l = np_mae_loss(p.eps, b.eps, 1 - hidden, False)
            x0_l = np_mae_loss(p.x0, b.x0, hidden, norm_pix)
        total += nn / (n0 + nn) * 0.5 * (eps_l + x0_l)
    return total


# -- tests --------------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(name=st.sampled_from(sorted(recipes.PRESETS)), seed=st.integers(0, 2**31 - 1))
def test_zero_for_perfect_predictions_positive_otherwise(name, seed):
    recipe = recipes.get(name, num_steps=T)
    sched = SCHEDULES[recipe.schedule]
    branches = mixed(recipe, seed)
    target = lambda b: np.asarray(uc.normalize_patches(b.x0)) if recipe.norm_pix_loss else b.x0  # noqa: E731
    perfect = tuple(uc.Prediction(x0=target(b), eps=b.eps) for b in branches)
    loss, metrics = jit_loss(recipe, sched, branches, perfect)
    # Exact, except that the normalised target is recomputed inside the jitted loss
    # (fused differently), which can move it by an ulp.
    tol = 1e-10 if recipe.norm_pix_loss else 0.0
    assert float(loss) <= tol
    assert all(float(v) <= tol for v in metrics.values())
    loss, metrics = jit_loss(recipe, sched, branches, random_preds(branches, seed))
    assert float(loss) > 0
    no_clean_rows = uc.split_batch(B, recipe.r_t0)[0] == 0
    for key, v in metrics.items():
        assert v.dtype == jnp.float32 and v.shape == (), key
        if key == "loss_clean" and no_clean_rows:  # umd_finetune: int(8 * 0.05) = 0
            assert float(v) == 0.0
        else:
            assert float(v) > 0, key


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), name=st.sampled_from(["umd", "maskdit"]))
def test_gradients_cover_exactly_the_right_tokens(seed, name):
    recipe = recipes.get(name, num_steps=T)
    branches = mixed(recipe, seed)
    preds = random_preds(branches, seed)
    names = recipe.branch_names(uc.split_batch(B, recipe.r_t0)[0], B)
    grads = jax.device_get(jit_loss_grad(recipe, SCHEDULES["cosine"], branches, preds))
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, preds)
    n0 = B // 2 if "clean" in names else 0
    for name_, b, p, g in zip(names, branches, preds, grads):
        hidden = np.asarray(b.masking.mask, bool)[..., None]
        nb = b.x0.shape[0]
        k = int((~hidden[0, :, 0]).sum())
        g_x0, g_eps = np.asarray(g.x0), np.asarray(g.eps)
        if name_ == "clean":
            np.testing.assert_array_equal(g_eps, 0.0)
            np.testing.assert_array_equal(g_x0 * ~hidden, 0.0)
            want = (n0 / B) * 2 * (p.x0 - b.x0) / (nb * (L - k) * P)
            np.testing.assert_allclose(g_x0 * hidden, want * hidden, rtol=1e-4, atol=1e-9)
            continue
        # Noisy branch: eps only on visible tokens, x0 only on hidden tokens.
        np.testing.assert_array_equal(g_eps * hidden, 0.0)
        np.testing.assert_array_equal(g_x0 * ~hidden, 0.0)
        w = (B - n0) / B * 0.5
        want_eps = w * 2 * (p.eps - b.eps) / (nb * k * P)
        want_x0 = w * 2 * (p.x0 - b.x0) / (nb * (L - k) * P)
        np.testing.assert_allclose(g_eps * ~hidden, want_eps * ~hidden, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(g_x0 * hidden, want_x0 * hidden, rtol=1e-4, atol=1e-9)
        assert np.all(np.abs(g_eps[~hidden[..., 0]]) > 0) and np.all(np.abs(g_x0[hidden[..., 0]]) > 0)


@settings(max_examples=8, deadline=None)
@given(name=st.sampled_from(["umd", "umd_finetune", "maskdit", "dit"]), seed=st.integers(0, 2**31 - 1),
       norm_pix=st.booleans())
@example(name="umd", seed=0, norm_pix=True).via("norm_pix on both branches")
@example(name="dit", seed=0, norm_pix=True).via("norm_pix on an unmasked noisy branch")
def test_umd_loss_equals_the_numpy_formula(name, seed, norm_pix):
    """Also with per-patch normalised x0 targets (norm_pix_loss), which the presets use
    only on the clean branch (MAE, USP) but the loss applies to every x0 term."""
    recipe = recipes.get(name, num_steps=T, norm_pix_loss=norm_pix)
    branches = mixed(recipe, seed)
    preds = random_preds(branches, seed)
    names = recipe.branch_names(uc.split_batch(B, recipe.r_t0)[0], B)
    loss, _ = jit_loss(recipe, SCHEDULES[recipe.schedule], branches, preds)
    np.testing.assert_allclose(float(loss), np_umd(branches, preds, names, norm_pix), rtol=1e-5)


@settings(max_examples=6, deadline=None)
@given(name=st.sampled_from(["mae", "mae_norm_pix", "usp"]), seed=st.integers(0, 2**31 - 1))
def test_mae_presets_equal_an_independent_mae_loss(name, seed):
    recipe = recipes.mae(norm_pix_loss=True) if name == "mae_norm_pix" else recipes.get(name)
    recipe = recipe.replace(num_steps=T)
    (clean,) = mixed(recipe, seed)
    assert clean.x0.shape[0] == B and clean.masking.ids_keep.shape[1] == L // 4
    (pred,) = random_preds((clean,), seed)
    loss, metrics = jit_loss(recipe, SCHEDULES[recipe.schedule], (clean,), (pred,))
    want = np_mae_loss(pred.x0, clean.x0, clean.masking.mask, recipe.norm_pix_loss)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert set(metrics) == {"loss", "loss_clean"}


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_dit_preset_is_half_eps_plus_x0_mse_over_all_tokens(seed):
    recipe = recipes.dit(num_steps=T)
    (noisy,) = mixed(recipe, seed)
    assert noisy.masking is None
    (pred,) = random_preds((noisy,), seed)
    loss, metrics = jit_loss(recipe, SCHEDULES["cosine"], (noisy,), (pred,))
    eps_mse, x0_mse = np_mse(pred.eps, noisy.eps), np_mse(pred.x0, noisy.x0)
    np.testing.assert_allclose(float(loss), 0.5 * (eps_mse + x0_mse), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["eps_loss"]), eps_mse, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["x0_loss"]), x0_mse, rtol=1e-5)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_mdt_two_pass_sums_all_token_eps_losses(seed):
    recipe = recipes.mdt(num_steps=T)
    full, masked = mixed(recipe, seed)
    preds = random_preds((full, masked), seed)
    loss, metrics = jit_loss(recipe, SCHEDULES["linear"], (full, masked), preds)
    want_full, want_masked = np_mse(preds[0].eps, full.eps), np_mse(preds[1].eps, masked.eps)
    np.testing.assert_allclose(float(loss), want_full + want_masked, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_full"]), want_full, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_masked"]), want_masked, rtol=1e-5)
    assert set(metrics) == {"loss", "loss_noisy", "loss_full", "loss_masked", "eps_loss"}
    # The x0 head plays no part in MDT's loss.
    g = jit_loss_grad(recipe, SCHEDULES["linear"], (full, masked), preds)
    np.testing.assert_array_equal(g[0].x0, 0.0)
    np.testing.assert_array_equal(g[1].x0, 0.0)


def test_missing_heads_are_derived_with_the_schedule():
    recipe = recipes.umd(num_steps=T)
    sched = SCHEDULES["cosine"]
    clean, noisy = mixed(recipe, 3)
    p_clean, p_noisy = random_preds((clean, noisy), 3)
    # Independent float64 inversions of x_t = sqrt(a) x0 + sqrt(1 - a) eps.
    a = np.asarray(sched.alphas_cumprod, np.float64)[noisy.t][:, None, None]
    derived_x0 = ((noisy.x_t - np.sqrt(1 - a) * p_noisy.eps) / np.sqrt(a)).astype(np.float32)
    derived_eps = ((noisy.x_t - np.sqrt(a) * p_noisy.x0) / np.sqrt(1 - a)).astype(np.float32)
    pairs = [
        (uc.Prediction(None, p_noisy.eps), uc.Prediction(derived_x0, p_noisy.eps)),
        (uc.Prediction(p_noisy.x0, None), uc.Prediction(p_noisy.x0, derived_eps)),
    ]
    for missing, explicit in pairs:
        got, _ = jit_loss(recipe, sched, (clean, noisy), (p_clean, missing))
        want, _ = jit_loss(recipe, sched, (clean, noisy), (p_clean, explicit))
        np.testing.assert_allclose(float(got), float(want), rtol=1e-4)


def test_metric_keys_are_static_per_recipe():
    # A batch of one has no clean row under r_t0 = 0.5; the key is still reported.
    recipe = recipes.umd(num_steps=T)
    x0 = np.ones((1, 4, 2), np.float32)
    hidden_last_two = uc.Masking(
        ids_keep=np.array([[0, 1]], np.int32),
        ids_restore=np.array([[0, 1, 2, 3]], np.int32),
        mask=np.array([[0, 0, 1, 1]], np.float32),
    )
    branch = uc.Branch(x0, np.array([3], np.int32), x0, 0 * x0, hidden_last_two, None)
    _, metrics = jit_loss(recipe, SCHEDULES["cosine"], (branch,), (uc.Prediction(x0, x0),))
    assert set(metrics) == {"loss", "loss_clean", "loss_noisy", "eps_loss", "x0_loss"}
    assert float(metrics["loss_clean"]) == 0.0


def test_loss_compiles_once():
    recipe = recipes.umd(num_steps=T)
    traces = []

    @jax.jit
    def loss_fn(branches, preds):
        traces.append(1)  # runs only while tracing
        return uc.umd_loss(recipe, SCHEDULES["cosine"], branches, preds)[0]

    for seed in range(3):
        branches = mixed(recipe, seed)
        loss_fn(branches, random_preds(branches, seed))
    assert len(traces) == 1


@settings(max_examples=6, deadline=None)
@given(shape=st.sampled_from([(2, 3), (2, 4, 12)]), seed=st.integers(0, 2**31 - 1))
def test_normalize_patches_matches_numpy(shape, seed):
    x = np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)
    got = np.asarray(uc.normalize_patches(jnp.asarray(x)))
    np.testing.assert_allclose(got, np_norm_pix(x), rtol=1e-4, atol=1e-5)


def test_loss_errors():
    recipe = recipes.umd(num_steps=T)
    sched = SCHEDULES["cosine"]
    clean, noisy = mixed(recipe, 0)
    p_clean, p_noisy = random_preds((clean, noisy), 0)
    with pytest.raises(ValueError, match="preds"):
        uc.umd_loss(recipe, sched, (clean, noisy), (p_clean,))
    with pytest.raises(ValueError, match="clean branch needs an x0"):
        uc.umd_loss(recipe, sched, (clean, noisy), (uc.Prediction(None, p_clean.eps), p_noisy))
    with pytest.raises(ValueError, match="norm_pix_loss"):
        uc.umd_loss(
            recipe.replace(norm_pix_loss=True), sched, (clean, noisy),
            (p_clean, uc.Prediction(None, p_noisy.eps)),
        )
    # The other head missing: an eps derived from a normalised-target x0 head is wrong
    # (a perfect predictor scored eps_loss 0.78 instead of raising).
    with pytest.raises(ValueError, match="norm_pix_loss needs an eps prediction head"):
        uc.umd_loss(
            recipe.replace(norm_pix_loss=True), sched, (clean, noisy),
            (p_clean, uc.Prediction(p_noisy.x0, None)),
        )
    with pytest.raises(ValueError, match="shape"):
        uc.umd_loss(recipe, sched, (clean, noisy), (p_clean, uc.Prediction(p_noisy.x0[:, :2], p_noisy.eps)))
    with pytest.raises(ValueError, match="neither"):
        uc.umd_loss(recipe, sched, (clean, noisy), (p_clean, uc.Prediction(None, None)))
    with pytest.raises(ValueError, match="branches"):
        uc.umd_loss(recipes.dit(num_steps=T), sched, (clean, noisy), (p_clean, p_noisy))
    with pytest.raises(ValueError, match="P=1"):
        uc.normalize_patches(jnp.ones((2, 1)))
