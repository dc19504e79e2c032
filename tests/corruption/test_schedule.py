"""Schedules against closed forms written here in numpy, and the forward-process round trips."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unidiff import corruption as uc

SETTINGS = settings(max_examples=15, deadline=None)


def cosine_closed_form(T: int) -> tuple[np.ndarray, np.ndarray]:
    """Nichol & Dhariwal's cosine schedule, written out step by step, plus the clean step."""
    s = 0.008
    f = [math.cos(((t / T + s) / (1 + s)) * math.pi / 2) ** 2 for t in range(T + 1)]
    betas = [0.0] + [min(1.0 - f[t] / f[t - 1], 0.999) for t in range(1, T + 1)]
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        abar.append(prod)
    return np.array(betas), np.array(abar)


def linear_closed_form(T: int) -> tuple[np.ndarray, np.ndarray]:
    """DDPM's linear betas from 1e-4 to 0.02 at T = 1000, scaled by 1000 / T for other T
    and clipped at 0.999, plus the clean step."""
    lo, hi = 0.1 / T, 20.0 / T
    noisy = [min(lo if T == 1 else lo + (hi - lo) * i / (T - 1), 0.999) for i in range(T)]
    betas = [0.0] + noisy
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        abar.append(prod)
    return np.array(betas), np.array(abar)


CLOSED = {"cosine": cosine_closed_form, "linear": linear_closed_form}


@SETTINGS
@given(kind=st.sampled_from(["cosine", "linear"]), T=st.integers(1, 400))
def test_schedule_matches_closed_form(kind, T):
    sched = uc.make_schedule(kind, T)
    chex.assert_shape([sched.betas, sched.alphas_cumprod], (T + 1,))
    chex.assert_type([sched.betas, sched.alphas_cumprod], jnp.float32)
    assert sched.num_steps == T
    betas, abar = CLOSED[kind](T)
    np.testing.assert_allclose(np.asarray(sched.betas), betas, rtol=2e-6, atol=1e-9)
    np.testing.assert_allclose(np.asarray(sched.alphas_cumprod), abar, rtol=2e-5, atol=1e-12)


def test_cosine_alpha_bar_is_f_ratio_where_unclipped():
    # Away from the clipped last step alpha_bar(t) = f(t)/f(0) exactly (telescoping).
    T, s = 1000, 0.008
    t = np.arange(T + 1)
    f = np.cos(((t / T + s) / (1 + s)) * np.pi / 2) ** 2
    abar = np.asarray(uc.make_schedule("cosine", T).alphas_cumprod)
    np.testing.assert_allclose(abar[: T - 1], (f / f[0])[: T - 1], rtol=1e-4, atol=1e-10)


@SETTINGS
@given(T=st.integers(50, 4000))
def test_linear_schedule_ends_in_noise_for_any_T(T):
    """The linear line is scaled by 1000 / T, so x_T is noise for every T: the betas sum
    to (0.1 + 20) / 2 = 10.05 whatever T is, and since -log(1 - b) >= b, alpha_bar_T <=
    exp(-10.05) (unscaled, T = 50 ended at alpha_bar_T = 0.6). Beyond first order,
    -log alpha_bar_T exceeds the sum by about sum(b^2) / 2 ~ 67 / T, so for T >= 400 it is
    within 2% of T = 1000's."""
    sched = uc.make_schedule("linear", T)
    abar = np.asarray(sched.alphas_cumprod, np.float64)
    ref = np.asarray(uc.make_schedule("linear", 1000).alphas_cumprod, np.float64)
    np.testing.assert_allclose(np.asarray(sched.betas, np.float64)[1:].sum(), 10.05, rtol=1e-5)
    assert abar[-1] <= np.exp(-10.05) * (1 + 1e-4)
    if T >= 400:
        assert abs(np.log(abar[-1]) / np.log(ref[-1]) - 1) < 0.02
    # At T = 1000 the line is DDPM's own, unscaled.
    np.testing.assert_allclose(np.asarray(uc.make_schedule("linear", 1000).betas)[[1, -1]],
                               [1e-4, 0.02], rtol=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("T", [1, 2, 50, 1000])
def test_alpha_bar_clean_step_and_monotone(kind, T):
    sched = uc.make_schedule(kind, T)
    abar = np.asarray(sched.alphas_cumprod)
    assert abar[0] == 1.0 and float(sched.betas[0]) == 0.0
    noisy = abar[1:]
    assert np.all(noisy > 0) and np.all(noisy < 1)
    assert np.all(np.diff(abar) < 0), "alpha_bar must strictly decrease on 0..T"


@pytest.mark.parametrize(
    "kind,T,match",
    [("sigmoid", 10, "sigmoid"), ("cosine", 0, "num_steps"), ("linear", -3, "num_steps"),
     ("cosine", 2.5, "num_steps")],
)
def test_make_schedule_rejects(kind, T, match):
    with pytest.raises(ValueError, match=match):
        uc.make_schedule(kind, T)


@jax.jit
def _forward_and_back(sched, x0, eps, t):
    zero = jnp.zeros_like(t)
    xt = uc.q_sample(sched, x0, t, eps)
    return dict(
        q0=uc.q_sample(sched, x0, zero, eps),
        x0_at0=uc.x0_from_eps(sched, x0, zero, eps),
        eps_at0=uc.eps_from_x0(sched, x0, zero, x0),
        xt=xt,
        x0_back=uc.x0_from_eps(sched, xt, t, eps),
        eps_back=uc.eps_from_x0(sched, xt, t, x0),
    )


@SETTINGS
@given(
    kind=st.sampled_from(["cosine", "linear"]),
    shape=st.sampled_from([(1,), (3, 2), (2, 4, 3)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_q_sample_at_t0_is_exact_and_round_trips(kind, shape, seed):
    T = 50
    sched = uc.make_schedule(kind, T)
    rng = np.random.default_rng(seed)
    b = shape[0]
    x0 = rng.standard_normal(shape).astype(np.float32)
    eps = rng.standard_normal(shape).astype(np.float32)
    t = rng.integers(0, T + 1, size=(b,)).astype(np.int32)
    out = jax.device_get(_forward_and_back(sched, x0, eps, t))
    # t = 0 is the clean step: nothing is added, nothing is removed.
    np.testing.assert_array_equal(out["q0"], x0)
    np.testing.assert_array_equal(out["x0_at0"], x0)
    np.testing.assert_array_equal(out["eps_at0"], np.zeros(shape, np.float32))
    # Independent float64 forward process.
    a = np.asarray(sched.alphas_cumprod, np.float64)[t].reshape((b,) + (1,) * (len(shape) - 1))
    want = np.sqrt(a) * x0.astype(np.float64) + np.sqrt(1 - a) * eps.astype(np.float64)
    np.testing.assert_allclose(out["xt"], want, rtol=1e-5, atol=1e-5)
    # Inverting amplifies float32 rounding by 1/sqrt(a) (x0) or 1/sqrt(1-a) (eps).
    assert np.all(np.abs(out["x0_back"] - x0) < 1e-5 * (1 + 4 / np.sqrt(a)))
    noisy = (t > 0).reshape(a.shape)
    tol = 1e-5 * (1 + 4 / np.sqrt(np.maximum(1 - a, 1e-30)))
    assert np.all(np.abs(out["eps_back"] - eps) * noisy < tol)
    np.testing.assert_array_equal(out["eps_back"][~noisy.reshape(-1)], 0.0)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), t_max=st.sampled_from([1, 5, 30, 1000]))
def test_bfloat16_inputs_get_their_noise_at_small_t(seed, t_max):
    """In bfloat16, alpha_bar_t of the cosine schedule rounds to 1.0 for about the first 20
    noisy steps; the coefficients must still come from float32, so that x_t carries
    sqrt(1 - alpha_bar_t) eps to bfloat16 precision instead of no noise at all."""
    sched = uc.make_schedule("cosine", 1000)
    rng = np.random.default_rng(seed)
    t = rng.integers(1, t_max + 1, size=(16,)).astype(np.int32)
    a = np.asarray(sched.alphas_cumprod, np.float64)[t][:, None]
    eps = jnp.asarray(rng.standard_normal((16, 4)), jnp.bfloat16)
    eps64 = np.asarray(eps, np.float64)
    q = jax.jit(uc.q_sample)
    # x0 = 0 isolates the noise term: sigma and the product each round once (2^-8 relative).
    noise = q(sched, jnp.zeros((16, 4), jnp.bfloat16), t, eps)
    assert noise.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(noise, np.float64), np.sqrt(1 - a) * eps64, rtol=2.0**-7)
    # With an image, x_t matches the float64 forward process to bfloat16 precision.
    x0 = jnp.asarray(rng.uniform(-1, 1, (16, 4)), jnp.bfloat16)
    xt = np.asarray(q(sched, x0, t, eps), np.float64)
    want = np.sqrt(a) * np.asarray(x0, np.float64) + np.sqrt(1 - a) * eps64
    assert np.all(np.abs(xt - want) <= 2.0**-7 * (1 + np.abs(want)))


def test_forward_process_refuses_what_it_would_broadcast_or_round():
    """A (1,) t or noise row used to broadcast over the whole batch (one draw reused for
    every row), and integer inputs came back with the noise rounded away."""
    sched = uc.make_schedule("cosine", 50)
    x = jnp.zeros((4, 16, 3))
    t = jnp.arange(4)
    with pytest.raises(ValueError, match=r"t must have shape \(B,\) = \(4,\)"):
        uc.q_sample(sched, x, jnp.ones((1,), jnp.int32), x)
    with pytest.raises(ValueError, match="noise must have the shape of x0"):
        uc.q_sample(sched, x, t, x[0])
    with pytest.raises(ValueError, match="x must be floating point, got uint8"):
        uc.q_sample(sched, x.astype(jnp.uint8), t, x.astype(jnp.uint8))
    with pytest.raises(ValueError, match="eps must have the shape of xt"):
        uc.x0_from_eps(sched, x, t, x[:1])
    with pytest.raises(ValueError, match="x0 must have the shape of xt"):
        uc.eps_from_x0(sched, x, t, x[:, :1])
    with pytest.raises(ValueError, match="t must have shape"):
        uc.eps_from_x0(sched, x, t[:, None], x)
    # A scalar t applies to every row, as documented; under jit the checks are static.
    one = jax.jit(lambda x, t: uc.q_sample(sched, x, t, x))(x, jnp.int32(3))
    np.testing.assert_allclose(np.asarray(one), np.asarray(uc.q_sample(sched, x, jnp.full((4,), 3), x)))


def test_a_python_int_t_is_a_scalar_for_every_row():
    """README: t of shape (B,) "or a scalar for all rows". A Python int raised
    AttributeError ('int' object has no attribute 'shape'); a float t named no argument."""
    sched = uc.make_schedule("cosine", 50)
    x = jax.random.normal(jax.random.key(0), (4, 16, 3))
    eps = jax.random.normal(jax.random.key(1), (4, 16, 3))
    full = jnp.full((4,), 7)
    for fn, b in ((uc.q_sample, eps), (uc.x0_from_eps, eps), (uc.eps_from_x0, x)):
        np.testing.assert_array_equal(np.asarray(fn(sched, x, 7, b)), np.asarray(fn(sched, x, full, b)))
    with pytest.raises(ValueError, match="t must hold integer table indices"):
        uc.q_sample(sched, x, jnp.full((4,), 7.0), eps)


def test_make_schedule_refuses_a_bool_num_steps():
    """make_schedule("cosine", True) built a T = 1 schedule (Recipe refuses the same bool)."""
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1, got True"):
        uc.make_schedule("cosine", True)


def test_t_outside_the_table_is_refused_or_nan_never_wrapped():
    make_schedule, q_sample = uc.make_schedule, uc.q_sample
    """jnp.take read t = -1 as t = T (almost pure noise, silently) and t > T as NaN."""
    s = make_schedule("cosine", 100)
    x0, eps = jnp.ones((2, 4, 3)), jnp.zeros((2, 4, 3))
    for bad in (-1, 101, np.array([0, 101]), np.array([-3, 5], np.int32)):
        with pytest.raises(ValueError, match=r"t must be table indices in 0..T = 0..100"):
            q_sample(s, x0, bad, eps)
    # Traced values cannot be checked: out-of-range rows are NaN, in-range rows exact.
    f = jax.jit(lambda t: q_sample(s, x0, t, eps)[:, 0, 0])
    out = np.asarray(f(jnp.array([-1, 100])))
    assert np.isnan(out[0]) and out[1] == np.float32(np.sqrt(s.alphas_cumprod[100]))
    assert np.isnan(np.asarray(f(jnp.array([101, 0]))))[0] and np.asarray(f(jnp.array([101, 0])))[1] == 1.0
    # The ends of the table are inside.
    np.testing.assert_array_equal(q_sample(s, x0, 0, eps), x0)
    assert np.isfinite(np.asarray(q_sample(s, x0, np.array([100, 100]), eps))).all()
