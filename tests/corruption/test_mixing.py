"""split_batch invariants and the mixing step (structure, per-example keys, jit)."""

import math
from fractions import Fraction

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unidiff import corruption as uc
from unidiff.corruption import recipes
from unidiff.corruption.mixing import normal_from_bits

from .common import MIX_TRACES, L, P, SCHEDULES, T, jit_mix, make_batch

B = 8  # one batch shape across tests, so compilations are shared

# -- split_batch -----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    per_device=st.integers(1, 64),
    num_devices=st.integers(1, 8),
    r_t0=st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 0.05, 0.29, 0.375, 0.5, 1.0])),
)
def test_split_batch_is_equal_per_device(per_device, num_devices, r_t0):
    b = per_device * num_devices
    n_clean, n_noisy = uc.split_batch(b, r_t0, num_devices)
    assert n_clean + n_noisy == b and n_clean >= 0 and n_noisy >= 0
    assert n_clean % num_devices == 0 and n_noisy % num_devices == 0
    # floor(B r) rounded down to a multiple of D, with r read as the decimal it prints as.
    exact = Fraction(repr(r_t0)) * b
    assert n_clean <= exact < n_clean + num_devices
    # The per-device split agrees with the global one.
    assert n_clean == num_devices * uc.split_batch(per_device, r_t0)[0]
    if num_devices == 1 and r_t0 in (0.0, 1.0):
        assert n_clean == int(b * r_t0)


@pytest.mark.parametrize(
    "args,want",
    [((1024, 0.5), (512, 512)), ((256, 0.05), (12, 244)), ((100, 0.29), (29, 71)),
     ((10, 1.0), (10, 0)), ((7, 0.0), (0, 7)), ((8, 0.5, 8), (0, 8)), ((16, 0.5, 4), (8, 8)),
     ((12, 0.75, 4), (8, 4))],
)
def test_split_batch_examples(args, want):
    assert uc.split_batch(*args) == want


@pytest.mark.parametrize(
    "args,match",
    [((10, 0.5, 3), "num_devices"), ((0, 0.5), "batch_size"), ((4.0, 0.5), "batch_size"),
     ((4, 1.5), "r_t0"), ((4, -0.5), "r_t0"), ((4, float("nan")), "r_t0"), ((4, 0.5, 0), "num_devices")],
)
def test_split_batch_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        uc.split_batch(*args)


# -- mix ---------------------------------------------------------------------------------


# Every preset, each with its own draws (sampled presets missed the one with a clean
# branch masked at another ratio in most runs).
@pytest.mark.parametrize("name", sorted(recipes.PRESETS))
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_mix_builds_the_branches(name, seed):
    recipe = recipes.get(name, num_steps=T)
    sched = SCHEDULES[recipe.schedule]
    b = B
    keys, x0, labels = make_batch(seed, b)
    n_clean = uc.split_batch(b, recipe.r_t0)[0]
    branches = jit_mix(recipe, sched, keys, x0, labels, num_clean=n_clean)
    names = recipe.branch_names(n_clean, b)
    assert len(branches) == len(names)
    k_clean, k_noisy = recipe.keep_counts(L)
    abar = np.asarray(sched.alphas_cumprod, np.float64)
    x0_np, labels_np = np.asarray(x0), np.asarray(labels)
    noisy_rows = slice(n_clean, b)
    by_name = dict(zip(names, branches))
    for name_, br in by_name.items():
        rows = slice(0, n_clean) if name_ == "clean" else noisy_rows
        nb = rows.stop - rows.start
        chex.assert_shape([br.x_t, br.x0, br.eps], (nb, L, P))
        chex.assert_type([br.t], jnp.int32)
        np.testing.assert_array_equal(br.x0, x0_np[rows])
        np.testing.assert_array_equal(br.labels, labels_np[rows])  # passed through unchanged
        t = np.asarray(br.t)
        if name_ == "clean":
            np.testing.assert_array_equal(t, 0)
            np.testing.assert_array_equal(br.x_t, x0_np[rows])
            np.testing.assert_array_equal(br.eps, 0.0)
            chex.assert_shape(br.masking.ids_keep, (nb, k_clean))
            np.testing.assert_array_equal(np.asarray(br.masking.mask).sum(1), L - k_clean)
            continue
        assert np.all((1 <= t) & (t <= T))
        a = abar[t][:, None, None]
        want = np.sqrt(a) * x0_np[rows] + np.sqrt(1 - a) * np.asarray(br.eps, np.float64)
        np.testing.assert_allclose(br.x_t, want, rtol=1e-5, atol=1e-5)
        assert np.std(np.asarray(br.eps)) > 0.3  # real Gaussian noise, not zeros
        masked = name_ == "masked" or (name_ == "noisy" and recipe.m_t > 0)
        if masked:
            chex.assert_shape(br.masking.ids_keep, (nb, k_noisy))
            np.testing.assert_array_equal(np.asarray(br.masking.mask).sum(1), L - k_noisy)
        else:
            assert br.masking is None
    if recipe.mdt_two_pass:
        full, masked = by_name["full"], by_name["masked"]
        np.testing.assert_array_equal(full.t, masked.t)  # same t
        assert not np.allclose(full.eps, masked.eps)  # independent noise


@pytest.mark.parametrize("make", [recipes.mdt, lambda num_steps: recipes.umd(num_steps=num_steps, r_t0=0.25)],
                         ids=["mdt", "umd_r0.25"])
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), a=st.integers(0, 5))
def test_noisy_rows_do_not_depend_on_the_rest_of_the_batch(make, seed, a):
    # MDT: both passes of a row come from its own key. UMD with 2 clean rows of 8: a
    # noisy row's mask must not come from the words of another row (with as many clean
    # rows as noisy ones, rows i and i + n_clean can look alike).
    recipe = make(num_steps=T)
    b, width = B, 3
    n_clean = uc.split_batch(b, recipe.r_t0)[0]
    keys, x0, labels = make_batch(seed, b)
    full = jit_mix(recipe, SCHEDULES[recipe.schedule], keys, x0, labels, num_clean=n_clean)
    noisy_full = full[1:] if n_clean else full
    lo = n_clean + min(a, b - n_clean - width)
    hi = lo + width
    part = jit_mix(
        recipe, SCHEDULES[recipe.schedule], keys[lo:hi], x0[lo:hi], labels[lo:hi], num_clean=0
    )
    assert len(part) == len(noisy_full)
    for whole, piece in zip(noisy_full, part):
        sliced = jax.tree.map(lambda v: v[lo - n_clean:hi - n_clean], whole)
        chex.assert_trees_all_equal(sliced, piece)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_devices=st.sampled_from([2, 4]))
def test_per_device_mixing_matches_the_global_draws(seed, num_devices):
    # Global batch of 8 in canonical order (clean rows first); each device takes its
    # share of clean rows and of noisy rows and mixes them with its own keys.
    recipe = recipes.umd(num_steps=T)
    sched = SCHEDULES["cosine"]
    b = B
    n_clean, _ = uc.split_batch(b, recipe.r_t0, num_devices)
    assert n_clean == uc.split_batch(b, recipe.r_t0)[0]
    keys, x0, labels = make_batch(seed, b)
    clean_g, noisy_g = jax.device_get(jit_mix(recipe, sched, keys, x0, labels, num_clean=n_clean))
    c, n = n_clean // num_devices, (b - n_clean) // num_devices
    for d in range(num_devices):
        rows = np.concatenate([d * c + np.arange(c), n_clean + d * n + np.arange(n)])
        clean_d, noisy_d = jax.device_get(
            jit_mix(recipe, sched, keys[rows], x0[rows], labels[rows], num_clean=c)
        )
        chex.assert_trees_all_equal(clean_d, jax.tree.map(lambda v: v[d * c:(d + 1) * c], clean_g))
        chex.assert_trees_all_equal(noisy_d, jax.tree.map(lambda v: v[d * n:(d + 1) * n], noisy_g))


def test_different_examples_get_different_draws():
    recipe = recipes.umd(num_steps=T)
    keys, x0, labels = make_batch(1, B)
    x0 = jnp.broadcast_to(x0[:1], x0.shape)  # identical images: differences come from keys
    clean, noisy = jit_mix(recipe, SCHEDULES["cosine"], keys, x0, labels, num_clean=4)
    assert len({tuple(np.asarray(m)) for m in clean.masking.mask}) == 4
    assert len({tuple(np.asarray(m)) for m in noisy.masking.mask}) == 4
    assert len(set(np.asarray(noisy.t).tolist())) > 1
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.allclose(noisy.eps[i], noisy.eps[j])
    # Another key for the same row changes its draws.
    keys2 = keys.at[0].set(jax.random.key(12345))
    clean2, _ = jit_mix(recipe, SCHEDULES["cosine"], keys2, x0, labels, num_clean=4)
    assert not np.array_equal(clean2.masking.mask[0], clean.masking.mask[0])
    np.testing.assert_array_equal(clean2.masking.mask[1:], clean.masking.mask[1:])


def test_legacy_uint32_keys_match_typed_keys():
    # mix consumes its keys only through the per-row word draw.
    from unidiff.corruption.mixing import _row_words

    raw = jax.random.split(jax.random.PRNGKey(3), 4)
    np.testing.assert_array_equal(_row_words(raw, 5), _row_words(jax.random.wrap_key_data(raw), 5))


def test_mix_compiles_once():
    # Equal recipes built afresh (a static, hashable argument) and new data of the same
    # shapes reuse the first trace and compilation.
    args = lambda seed: (SCHEDULES["cosine"], *make_batch(seed, B))  # noqa: E731
    jit_mix(recipes.umd(num_steps=T), *args(0), num_clean=4)
    traces, size = len(MIX_TRACES), jit_mix._cache_size()
    for seed in range(1, 4):
        jit_mix(recipes.umd(num_steps=T), *args(seed), num_clean=4)
    assert len(MIX_TRACES) == traces and jit_mix._cache_size() == size
    # Labels None is a static part of the input structure.
    clean, noisy = jit_mix(recipes.umd(num_steps=T), *args(0)[:3], num_clean=4)
    assert clean.labels is None and noisy.labels is None


def test_draws_have_the_intended_distributions():
    # Many rows of a tiny problem: t uniform on 1..T, every token equally likely hidden,
    # noise standard normal.
    n, t_max = 2048, 5
    recipe = recipes.maskdit(num_steps=t_max)
    keys = jax.random.split(jax.random.key(7), n)
    (br,) = jit_mix(recipe, uc.make_schedule("cosine", t_max), keys, jnp.zeros((n, 4, 2)))
    counts = np.bincount(np.asarray(br.t), minlength=t_max + 1)
    assert counts[0] == 0 and counts.sum() == n
    np.testing.assert_allclose(counts[1:] / n, 1 / t_max, atol=0.04)  # ~5 sigma
    np.testing.assert_allclose(np.asarray(br.masking.mask).mean(0), 0.5, atol=0.06)
    eps = np.asarray(br.eps).ravel()
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    for x in (-2.0, -1.0, 0.0, 0.5, 1.5):
        assert abs((eps <= x).mean() - cdf(x)) < 0.02


def test_normal_from_bits_is_symmetric_and_finite():
    words = jnp.array([0, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000], jnp.uint32)
    z = np.asarray(jax.jit(normal_from_bits)(words))
    assert np.all(np.isfinite(z))
    assert z[0] == -z[1] and z[2] == -z[3] and z[0] < -5 and abs(z[2]) < 1e-6


def test_mix_rejects_bad_inputs():
    recipe = recipes.umd(num_steps=T)
    sched = SCHEDULES["cosine"]
    keys, x0, labels = make_batch(0, B)
    with pytest.raises(ValueError, match="keys"):
        uc.mix(recipe, sched, keys[:3], x0)
    with pytest.raises(ValueError, match="keys"):
        uc.mix(recipe, sched, jax.random.key(0), x0)
    with pytest.raises(ValueError, match="x0"):
        uc.mix(recipe, sched, keys, x0[..., 0])
    with pytest.raises(ValueError, match="labels"):
        uc.mix(recipe, sched, keys, x0, labels[:2])
    with pytest.raises(ValueError, match="num_clean"):
        uc.mix(recipe, sched, keys, x0, num_clean=B + 1)
    with pytest.raises(ValueError, match="num_clean"):
        uc.mix(recipes.dit(num_steps=T), sched, keys, x0, num_clean=1)
    with pytest.raises(ValueError, match="m_t0"):
        uc.mix(recipe.replace(m_t0=0.95), sched, keys, x0)  # int(16 * 0.05) = 0 kept
    with pytest.raises(ValueError, match="schedule"):
        uc.mix(recipe, sched.alphas_cumprod, keys, x0)
    # Raw uint8 patches: the noise cast to them came back as 0, 1, 2.
    with pytest.raises(ValueError, match="x0 must be floating point"):
        uc.mix(recipe, sched, keys, (x0 * 127 + 128).astype(jnp.uint8))


def test_mix_refuses_a_schedule_with_another_number_of_steps():
    """recipe.num_steps = 50 with a T = 1000 schedule drew t up to 1000 without a word."""
    keys, x0, _ = make_batch(0, B)
    with pytest.raises(ValueError, match="num_steps"):
        uc.mix(recipes.umd(num_steps=T), uc.make_schedule("cosine", 2 * T), keys, x0)
