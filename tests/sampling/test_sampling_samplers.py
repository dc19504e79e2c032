"""DDIM / DDPM samplers: respacing, oracle recovery, Gaussian exactness, DDIM(eta=1) == DDPM.

Compiles are the cost on CPU (each jax.random.normal in a program takes ~1 s to compile),
so related checks share one jitted program.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unidiff.corruption.schedule import eps_from_x0, make_schedule
from unidiff.sampling import ddim_sample, ddim_timesteps, ddpm_sample, posterior_variance

SHAPE = (2, 4, 4, 3)


# --------------------------------------------------------------------------- timesteps
def test_ddim_timesteps_reference_example():
    t = ddim_timesteps(1000, 125)
    k = t - 1  # the reference code's 0-based noisy index
    expected_k = list(range(999, 6, -8)) + [0]  # 999, 991, ..., 7, then 0
    assert expected_k[:3] == [999, 991, 983] and expected_k[-2:] == [7, 0]
    np.testing.assert_array_equal(k, expected_k)
    assert len(t) == 126  # model calls
    assert len(t) - 1 == 125  # DDIM updates between consecutive values
    assert t[0] == 1000 and t[-2] == 8 and t[-1] == 1


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_ddim_timesteps_structure(data):
    T = data.draw(st.integers(1, 2000), label="T")
    steps = data.draw(st.integers(1, T), label="steps")
    stride = T // steps
    expected = []
    k = T - 1
    while k >= 0:
        expected.append(k)
        k -= stride
    if expected[-1] != 0:
        expected.append(0)
    got = ddim_timesteps(T, steps)
    np.testing.assert_array_equal(got, np.array(expected) + 1)
    assert got.dtype == np.int32
    assert np.all(np.diff(got) < 0) and got[0] == T and got[-1] == 1


@pytest.mark.parametrize("T,steps,needle", [
    (1000, 0, r"steps must be an integer in \[1, T = 1000\], got 0"),
    (1000, 1001, r"steps must be an integer in \[1, T = 1000\], got 1001"),
    (0, 1, "num_steps .* must be an integer >= 1, got 0"),
    (10, 2.5, r"steps must be an integer in \[1, T = 10\], got 2.5"),
])
def test_ddim_timesteps_rejects_bad_input(T, steps, needle):
    with pytest.raises(ValueError, match=needle):
        ddim_timesteps(T, steps)


# --------------------------------------------------------------------------- posterior variance
def test_posterior_variance_formula():
    s = make_schedule("linear", 50)
    betas = np.asarray(s.betas, np.float64)
    abar = np.asarray(s.alphas_cumprod, np.float64)
    expected = np.zeros(51)
    expected[1:] = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])
    got = np.asarray(posterior_variance(s))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-9)
    assert got[1] == 0.0  # abar_0 = 1: the last ancestral step adds no noise
    assert np.all(got[2:] > 0) and np.all(got[2:] < betas[2:] + 1e-7)


# --------------------------------------------------------------------------- oracle recovery
def _fixed_image():
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.95, 0.95, SHAPE).astype(np.float32)
    x[0, 0, 0, 0] = 1.5  # out of range: only reachable without clipping
    return jnp.asarray(x)


def _oracle(schedule, x_fixed):
    def fn(x_t, t, labels):
        return x_fixed, eps_from_x0(schedule, x_t, t, x_fixed)

    return fn


def _only(head, fn):
    """Hide the prediction the sampler must not use."""

    def wrapped(x_t, t, labels):
        x0, eps = fn(x_t, t, labels)
        return (None, eps) if head == "eps" else (x0, None)

    return wrapped


def test_deterministic_ddim_recovers_oracle_image_both_heads():
    s = make_schedule("cosine", 1000)
    x_fixed = _fixed_image()
    oracle = _oracle(s, x_fixed)

    @jax.jit
    def run(key):
        out = {}
        for head in ("eps", "x0"):
            for clip in (False, True):
                out[head, clip] = ddim_sample(
                    _only(head, oracle), s, key, SHAPE, steps=25, eta=0.0, head=head, clip_x0=clip
                )
        return out

    out = run(jax.random.PRNGKey(0))
    want = np.asarray(x_fixed)
    for head in ("eps", "x0"):
        np.testing.assert_allclose(np.asarray(out[head, False]), want, atol=1e-4)
        np.testing.assert_allclose(np.asarray(out[head, True]), np.clip(want, -1, 1), atol=1e-4)


def test_ddpm_with_oracle_converges_to_image():
    s = make_schedule("cosine", 50)
    x_fixed = jnp.clip(_fixed_image(), -1, 1)
    oracle = _oracle(s, x_fixed)
    got = jax.jit(lambda k: ddpm_sample(_only("eps", oracle), s, k, SHAPE, head="eps"))(
        jax.random.PRNGKey(1)
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(x_fixed), atol=1e-4)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_ddpm_last_step_returns_the_x0_prediction_exactly(kind):
    """At t = 1 the posterior mean is x0 (alpha_bar_0 = 1) and its variance 0, so a denoiser
    that always predicts x0 = 0.8 must end at 0.8 to float32 rounding; the separately
    rounded float32 betas table had made it 0.99947 * 0.8 with the cosine schedule."""
    s = make_schedule(kind, 1000)
    const = lambda x_t, t, labels: (jnp.full_like(x_t, 0.8), None)  # noqa: E731
    got = jax.jit(lambda k: ddpm_sample(const, s, k, SHAPE, head="x0", clip_x0=False))(
        jax.random.PRNGKey(2))
    np.testing.assert_allclose(np.asarray(got), 0.8, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- Gaussian data
MU, STD = 0.3, 0.5  # data x0 ~ N(MU, STD^2) per coordinate


def _gaussian_denoiser(schedule):
    """Exact E[x0 | x_t] for Gaussian data, returned with the matching eps."""

    def fn(x_t, t, labels):
        a = jnp.take(schedule.alphas_cumprod, t).reshape((-1,) + (1,) * (x_t.ndim - 1))
        gain = jnp.sqrt(a) * STD**2 / (a * STD**2 + 1.0 - a)
        x0 = MU + gain * (x_t - jnp.sqrt(a) * MU)
        return x0, eps_from_x0(schedule, x_t, t, x0)

    return fn


def test_samplers_reproduce_gaussian_data_distribution():
    n = 4096
    s_ddim = make_schedule("cosine", 1000)
    s_ddpm = make_schedule("cosine", 200)

    @jax.jit
    def run(key):
        k1, k2 = jax.random.split(key)
        ddim = ddim_sample(_gaussian_denoiser(s_ddim), s_ddim, k1, (n, 2), steps=50, clip_x0=False)
        ddpm = ddpm_sample(_gaussian_denoiser(s_ddpm), s_ddpm, k2, (n, 2), clip_x0=False)
        return ddim, ddpm

    for samples in run(jax.random.PRNGKey(2)):
        x = np.asarray(samples, np.float64).ravel()
        se = STD / np.sqrt(x.size)
        assert abs(x.mean() - MU) < 5 * se
        assert abs(x.std() - STD) < 0.05 * STD


def test_ddim_eta1_full_steps_equals_ddpm_and_heads_agree():
    # DDIM with eta = 1 over every step has sigma^2 = the posterior variance and the
    # posterior mean: the same chain as DDPM, drawing the same noise from the same key.
    s = make_schedule("cosine", 30)
    den = _gaussian_denoiser(s)

    @jax.jit
    def run(key):
        return {
            ("ddpm", "eps"): ddpm_sample(den, s, key, SHAPE, head="eps"),
            ("ddim", "eps"): ddim_sample(den, s, key, SHAPE, steps=30, eta=1.0, head="eps"),
            ("ddim", "x0"): ddim_sample(den, s, key, SHAPE, steps=30, eta=1.0, head="x0"),
        }

    out = run(jax.random.PRNGKey(3))
    ref = np.asarray(out["ddpm", "eps"])
    assert np.std(ref) > 0.1  # a real sample, not a collapsed constant
    for key, value in out.items():
        np.testing.assert_allclose(np.asarray(value), ref, atol=2e-4, err_msg=str(key))


@pytest.mark.parametrize("eta", [0.3, 0.5])
def test_ddim_between_deterministic_and_ancestral_follows_its_formula(eta):
    """DDIM (Song et al. eq. 12 and 16) at 0 < eta < 1, where eta^2 and eta differ:
    x_s = sqrt(a_s) x0 + sqrt(1 - a_s - sigma^2) eps + sigma z with
    sigma^2 = eta^2 (1 - a_s) / (1 - a_t) (1 - a_t / a_s), run here in float64 numpy on
    the sampler's own noise draws (its keys: x_T from the first half of the key, one key
    per update from the second)."""
    s = make_schedule("cosine", 30)
    den = _gaussian_denoiser(s)
    key = jax.random.PRNGKey(4)
    got = np.asarray(jax.jit(lambda k: ddim_sample(den, s, k, SHAPE, steps=10, eta=eta,
                                                   clip_x0=False))(key), np.float64)

    calls = ddim_timesteps(30, 10)
    key_init, key_steps = jax.random.split(key)
    step_keys = jax.random.split(key_steps, len(calls))
    abar = np.asarray(s.alphas_cumprod, np.float64)
    x = np.asarray(jax.random.normal(key_init, SHAPE, jnp.float32), np.float64)
    for tc, tn, k in zip(calls, [*calls[1:], 0], step_keys):
        a_t, a_s = abar[tc], abar[tn]
        gain = np.sqrt(a_t) * STD**2 / (a_t * STD**2 + 1.0 - a_t)  # exact E[x0 | x_t]
        x0 = MU + gain * (x - np.sqrt(a_t) * MU)
        eps = (x - np.sqrt(a_t) * x0) / np.sqrt(1.0 - a_t)
        var = eta**2 * (1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s)
        z = np.asarray(jax.random.normal(k, SHAPE, jnp.float32), np.float64)
        x = np.sqrt(a_s) * x0 + np.sqrt(1.0 - a_s - var) * eps + np.sqrt(var) * z
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- compile once, determinism
def test_sampler_traces_denoiser_once_and_is_deterministic_given_key():
    s = make_schedule("cosine", 1000)
    traces = []
    den = _gaussian_denoiser(s)

    def counting(x_t, t, labels):
        traces.append(x_t.shape)
        return den(x_t, t, labels)

    sample = jax.jit(lambda key: ddim_sample(counting, s, key, SHAPE, steps=40, eta=1.0))
    a = sample(jax.random.PRNGKey(5))
    b = sample(jax.random.PRNGKey(5))
    c = sample(jax.random.PRNGKey(6))
    assert traces == [SHAPE]  # one trace for all 41 model calls and all three runs
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert not np.allclose(np.asarray(a)[0], np.asarray(a)[1])  # batch rows get their own noise


def test_sampler_rejects_bad_input():
    s = make_schedule("cosine", 100)
    den = _gaussian_denoiser(s)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="head"):
        ddim_sample(den, s, key, SHAPE, steps=5, head="v")
    with pytest.raises(ValueError, match="labels"):
        ddim_sample(den, s, key, SHAPE, jnp.zeros((3,), jnp.int32), steps=5)
    for eta in (-1.0, 1.5, float("nan")):  # DDIM's eta lives in [0, 1]
        with pytest.raises(ValueError, match="eta"):
            ddim_sample(den, s, key, SHAPE, steps=5, eta=eta)
    with pytest.raises(ValueError, match="steps"):
        ddim_sample(den, s, key, SHAPE, steps=101)
    with pytest.raises(ValueError, match="eps_pred=None"):  # raised while tracing
        jax.eval_shape(lambda k: ddpm_sample(_only("x0", den), s, k, SHAPE, head="eps"), key)
