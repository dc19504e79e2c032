"""Few-shot linear probe: equal shots, separable data, agreement with an independent ridge."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unidiff.eval.probe import NonFiniteFeaturesError, fit_probe, few_shot_probe, predict, select_shots


def _blobs(rng, n_per_class, k, d, sep=8.0):
    centers = rng.standard_normal((k, d)) * sep
    y = np.repeat(np.arange(k), n_per_class)
    x = centers[y] + rng.standard_normal((y.size, d))
    perm = rng.permutation(y.size)
    return x[perm], y[perm]


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 6), shots=st.integers(1, 5), extra=st.integers(0, 4), seed=st.integers(0, 99))
def test_select_shots_is_exact_per_class(k, shots, extra, seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(shots, shots + extra + 1, size=k)
    labels = rng.permutation(np.repeat(np.arange(k) * 3, counts))  # non-contiguous class ids
    idx = select_shots(labels, shots, seed)
    assert len(np.unique(idx)) == idx.size == k * shots
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(np.bincount(labels[idx] // 3, minlength=k), np.full(k, shots))
    np.testing.assert_array_equal(idx, select_shots(labels, shots, seed))  # deterministic


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 5), shots=st.integers(1, 4), extra=st.integers(0, 5),
       broken=st.floats(0, 0.6), seed=st.integers(0, 99))
def test_unreadable_shots_are_replaced_within_their_class(k, shots, extra, broken, seed):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(k), rng.integers(shots, shots + extra + 1, size=k)))
    ok = rng.random(labels.size) >= broken

    def readable(i):
        return bool(ok[i])

    readable_per_class = np.bincount(labels[ok], minlength=k)
    if np.any(readable_per_class < shots):
        with pytest.raises(ValueError, match="readable train examples, fewer than shots"):
            select_shots(labels, shots, seed, readable)
        return
    idx = select_shots(labels, shots, seed, readable)
    assert np.all(ok[idx]) and len(np.unique(idx)) == idx.size and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=k), np.full(k, shots))
    # Readable picks are those of the plain selection; only unreadable ones were replaced.
    plain = select_shots(labels, shots, seed)
    np.testing.assert_array_equal(np.intersect1d(idx, plain), plain[ok[plain]])
    if ok.all():
        np.testing.assert_array_equal(idx, plain)
    np.testing.assert_array_equal(idx, select_shots(labels, shots, seed, lambda i: bool(ok[i])))


def test_select_shots_rejects_too_few():
    with pytest.raises(ValueError, match="class 2"):
        select_shots(np.array([0, 0, 1, 1, 2]), 2)
    with pytest.raises(ValueError, match="shots"):
        select_shots(np.array([0, 1]), 0)


def test_probe_solves_separable_problem():
    rng = np.random.default_rng(0)
    x, y = _blobs(rng, 60, 5, 16)
    xt, yt = x[:200], y[:200]
    xv, yv = x[200:], y[200:]
    assert few_shot_probe(xt, yt, xv, yv) == 1.0
    assert few_shot_probe(xt, yt, xv, yv, shots=5, seed=1) == 1.0
    # A random labelling of the test set cannot be predicted: the metric is not constant.
    assert few_shot_probe(xt, yt, xv, rng.permutation(yv)) < 0.6


def _independent_ridge(x, y, k, l2, bias=100.0):
    """Ridge via least squares on the augmented system [X; sqrt(l2) I] W = [Y; 0]."""
    mean = x.mean(0)
    std = np.sqrt(((x - mean) ** 2).mean(0)) + 1e-5
    xa = np.hstack([(x - mean) / std, np.full((len(x), 1), bias)])
    ya = np.where(y[:, None] == np.arange(k)[None, :], 1.0, -1.0)
    d1 = xa.shape[1]
    w, *_ = np.linalg.lstsq(
        np.vstack([xa, np.sqrt(l2) * np.eye(d1)]), np.vstack([ya, np.zeros((d1, k))]), rcond=None
    )
    return mean, std, w


@pytest.mark.parametrize("n,d", [(300, 12), (20, 64)])  # the d' x d' and the n x n branch
def test_probe_matches_independent_ridge(n, d):
    rng = np.random.default_rng(n)
    k = 4
    x = rng.standard_normal((n, d)) * rng.uniform(0.1, 5.0, d) + rng.standard_normal(d) * 3
    y = rng.integers(0, k, n)
    mean, std, w = _independent_ridge(x, y, k, 1024.0)
    probe = fit_probe(x, y, k, l2=1024.0)
    np.testing.assert_allclose(probe.mean, mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(probe.std, std, rtol=1e-10)
    np.testing.assert_allclose(probe.weights, w, rtol=1e-6, atol=1e-9)
    xv = rng.standard_normal((50, d)) * 2
    yv = rng.integers(0, k, 50)
    scores = np.hstack([(xv - mean) / std, np.full((50, 1), 100.0)]) @ w
    np.testing.assert_array_equal(predict(probe, xv), scores.argmax(1))
    acc = few_shot_probe(x, y, xv, yv, num_classes=k)
    assert acc == pytest.approx(np.mean(scores.argmax(1) == yv))


def test_probe_rejects_bad_shapes():
    with pytest.raises(ValueError, match="labels"):
        fit_probe(np.zeros((4, 2)), np.zeros(3, int), 2)
    with pytest.raises(ValueError, match="num_classes"):
        fit_probe(np.zeros((4, 2)), np.array([0, 1, 2, 3]), 2)
    probe = fit_probe(np.random.default_rng(0).standard_normal((6, 2)), np.array([0, 1] * 3), 2)
    with pytest.raises(ValueError, match="feats"):
        predict(probe, np.zeros((3, 5)))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bad=st.sampled_from([np.nan, np.inf, -np.inf]),
       where=st.sampled_from(["train", "test"]), rows=st.integers(1, 3))
def test_non_finite_features_are_refused_not_scored(seed, bad, where, rows):
    """NaN scores argmax to class 0, so an unchecked probe reports chance accuracy for a
    diverged encoder; the probe must refuse, naming the split and the bad rows."""
    rng = np.random.default_rng(seed)
    x, y = _blobs(rng, 5, 3, 4)
    xv, yv = _blobs(rng, 4, 3, 4)
    target = x if where == "train" else xv
    picked = rng.choice(target.shape[0], rows, replace=False)
    target[picked, rng.integers(0, 4, rows)] = bad
    with pytest.raises(NonFiniteFeaturesError, match=f"{where} features are not finite in {rows} of"):
        few_shot_probe(x, y, xv, yv, num_classes=3)


def test_l2_zero_is_minimum_norm_least_squares_even_when_singular():
    """l2 = 0 (accepted, and probe.py's --l2 allows it) solved the Gram system with
    np.linalg.solve, which raised LinAlgError('Singular matrix') for constant features
    (probe.py --random_init --l2=0: a traceback) and for n < d' with repeated rows."""
    rng = np.random.default_rng(0)
    y = np.arange(12) % 3
    for x in (np.ones((12, 5)),                                   # constant: d' x d' branch
              np.repeat(rng.standard_normal((4, 30)), 3, axis=0)):  # repeated rows: n x n branch
        probe = fit_probe(x, y, 3, l2=0.0)
        design = np.hstack([(x - probe.mean) / probe.std, np.full((12, 1), 100.0)])
        targets = 2.0 * np.eye(3)[y] - 1.0
        np.testing.assert_allclose(probe.weights, np.linalg.pinv(design) @ targets, atol=1e-8)
    # Non-singular: the same as the closed forms' l2 -> 0 limit.
    x = rng.standard_normal((40, 6))
    y = np.arange(40) % 4
    w0 = fit_probe(x, y, 4, l2=0.0).weights
    np.testing.assert_allclose(fit_probe(x, y, 4, l2=1e-9).weights, w0, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("l2", [float("nan"), float("inf"), -1.0])
def test_non_finite_or_negative_l2_is_refused(l2):
    """NaN and inf were accepted and scored every test example as class 0 (chance)."""
    rng = np.random.default_rng(0)
    y = np.arange(40) % 4
    x = rng.standard_normal((40, 6)) + y[:, None]
    with pytest.raises(ValueError, match="l2 must be a finite number >= 0"):
        few_shot_probe(x, y, x, y, l2=l2)
