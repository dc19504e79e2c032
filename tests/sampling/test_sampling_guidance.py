"""Classifier-free guidance: weights, batch doubling, consistency across heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unidiff.corruption.schedule import eps_from_x0, make_schedule
from unidiff.sampling import GuidanceSpec, ddim_sample, guidance_weight, guided

T = 1000
SCHEDULE = make_schedule("cosine", T)
NULL = 5


def toy_denoiser(x_t, t, labels):
    """Label- and time-dependent, returning a consistent (x0, eps) pair."""
    gain = 0.3 + 0.1 * labels.astype(jnp.float32)
    shift = 0.001 * t.astype(jnp.float32)
    bshape = (-1,) + (1,) * (x_t.ndim - 1)
    x0 = jnp.tanh(gain.reshape(bshape) * x_t + shift.reshape(bshape))
    return x0, eps_from_x0(SCHEDULE, x_t, t, x0)


_toy_jit = jax.jit(toy_denoiser)


@pytest.mark.parametrize("p", [1.0, 4.0, 7.5])  # --guidance_power; MDT uses 4
def test_power_cosine_endpoints_and_formula(p):
    w = 3.8
    t = jnp.arange(0, T + 1)
    got = np.asarray(guidance_weight(t, w, "power_cosine", p, T))
    # 1 up to the formula's value at k = T - 1: (w - 1)(1 - cos(pi / T^p)) / 2, 7e-6 at p = 1.
    assert got[T] == pytest.approx(1.0, abs=1e-5)
    # MDT's code evaluates the formula at its 0-based timestep k = t - 1: the last model
    # call (t = 1, k = 0) gets exactly w.
    assert got[1] == pytest.approx(w, abs=1e-6) and got[0] == pytest.approx(w, abs=1e-6)
    k = np.maximum(np.arange(0, T + 1, dtype=np.float64) - 1, 0)
    expected = (w - 1) * (1 - np.cos(np.pi * (1 - k / T) ** p)) / 2 + 1
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # Guidance grows as sampling proceeds from t = T to t = 0.
    assert np.all(np.diff(got) <= 1e-6)


def test_constant_weight():
    got = guidance_weight(jnp.array([1, 500, 1000]), 1.5, "constant", num_steps=T)
    np.testing.assert_allclose(np.asarray(got), 1.5)


@settings(max_examples=10, deadline=None)
@given(
    scale=st.floats(0.0, 6.0),
    kind=st.sampled_from(["constant", "power_cosine"]),
    seed=st.integers(0, 2**16),
    power=st.sampled_from([0.5, 2.0, 4.0]),
)
def test_guided_matches_formula_on_all_channels(scale, kind, seed, power):
    rng = np.random.default_rng(seed)
    b = 3
    x = jnp.asarray(rng.standard_normal((b, 4, 4, 4)), jnp.float32)  # 4 channels: all guided
    t = jnp.asarray(rng.integers(1, T + 1, b), jnp.int32)
    labels = jnp.asarray(rng.integers(0, NULL, b), jnp.int32)
    fn = guided(toy_denoiser, null_label=NULL, scale=scale, schedule_kind=kind, power=power,
                num_steps=T)
    gx0, geps = jax.jit(fn)(x, t, labels)
    cx0, ceps = (np.asarray(a, np.float64) for a in _toy_jit(x, t, labels))
    ux0, ueps = (np.asarray(a, np.float64) for a in _toy_jit(x, t, jnp.full((b,), NULL, jnp.int32)))
    k = np.asarray(t, np.float64) - 1  # MDT's 0-based timestep (t >= 1 here)
    if kind == "constant":
        w = np.full(b, scale)
    else:
        w = (scale - 1) * (1 - np.cos(np.pi * (1 - k / T) ** power)) / 2 + 1
    w = w.reshape(b, 1, 1, 1)
    np.testing.assert_allclose(np.asarray(gx0), ux0 + w * (cx0 - ux0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(geps), ueps + w * (ceps - ueps), atol=1e-4)


def test_scale_one_is_conditional_and_zero_is_unconditional():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3, 3, 2)), jnp.float32)
    t = jnp.array([1, 10, 400, 1000], jnp.int32)
    labels = jnp.array([0, 1, 2, 3], jnp.int32)
    for kind in ("constant", "power_cosine"):
        g1 = guided(toy_denoiser, null_label=NULL, scale=1.0, schedule_kind=kind, num_steps=T)
        for got, want in zip(jax.jit(g1)(x, t, labels), _toy_jit(x, t, labels)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    g0 = guided(toy_denoiser, null_label=NULL, scale=0.0, num_steps=T)
    for got, want in zip(jax.jit(g0)(x, t, labels), _toy_jit(x, t, jnp.full((4,), NULL, jnp.int32))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_guided_doubles_the_batch_once_with_null_labels():
    seen = []

    def recorder(x_t, t, labels):
        seen.append((x_t.shape, np.asarray(t), np.asarray(labels)))
        return toy_denoiser(x_t, t, labels)

    x = jnp.ones((3, 2, 2, 1))
    guided(recorder, null_label=NULL, scale=2.0, num_steps=T)(x, jnp.array([7, 8, 9]), jnp.array([0, 1, 2]))
    assert len(seen) == 1
    shape, t, labels = seen[0]
    assert shape == (6, 2, 2, 1)
    np.testing.assert_array_equal(t, [7, 8, 9, 7, 8, 9])
    np.testing.assert_array_equal(labels, [0, 1, 2, NULL, NULL, NULL])


def test_guided_predictions_stay_consistent_between_heads():
    # x0 <-> eps is affine with weights summing to one, so guiding either head agrees.
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4, 4, 3)), jnp.float32)
    t = jnp.array([20, 300, 900], jnp.int32)
    fn = jax.jit(guided(toy_denoiser, null_label=NULL, scale=4.0, num_steps=T))
    gx0, geps = fn(x, t, jnp.array([0, 1, 2], jnp.int32))
    np.testing.assert_allclose(np.asarray(geps), np.asarray(eps_from_x0(SCHEDULE, x, t, gx0)), atol=2e-4)


def test_ddim_with_scale_one_equals_conditional_sampling():
    labels = jnp.array([0, 3])
    key = jax.random.PRNGKey(3)
    kw = dict(steps=10, eta=0.0, head="eps")
    spec = GuidanceSpec(scale=1.0, null_label=NULL, schedule="power_cosine")

    @jax.jit
    def both(key, labels):
        plain = ddim_sample(toy_denoiser, SCHEDULE, key, (2, 4, 4, 1), labels, **kw)
        with_g = ddim_sample(toy_denoiser, SCHEDULE, key, (2, 4, 4, 1), labels, guidance=spec, **kw)
        return plain, with_g

    plain, with_g = both(key, labels)
    np.testing.assert_allclose(np.asarray(with_g), np.asarray(plain), atol=1e-5)


def test_bad_guidance_settings():
    with pytest.raises(ValueError, match="scale"):
        GuidanceSpec(scale=-0.5, null_label=NULL)
    with pytest.raises(ValueError, match="schedule"):
        GuidanceSpec(scale=1.5, null_label=NULL, schedule="linear")
    with pytest.raises(ValueError, match="null_label"):
        GuidanceSpec(scale=1.5, null_label=-1)
    with pytest.raises(ValueError, match="labels"):
        guided(toy_denoiser, null_label=NULL, scale=2.0, num_steps=T)(
            jnp.ones((2, 2, 2, 1)), jnp.array([1, 2]), None
        )
    with pytest.raises(ValueError, match="labels"):
        ddim_sample(
            toy_denoiser, SCHEDULE, jax.random.PRNGKey(0), (2, 2, 2, 1), None, steps=5,
            guidance=GuidanceSpec(scale=2.0, null_label=NULL),
        )
