"""Fréchet distance, streaming statistics, Inception Score and statistics files."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unidiff.eval.fid import (
    RunningStats,
    feature_stats,
    frechet_distance,
    inception_score,
    StatsFile,
    load_stats,
    read_stats,
    save_stats,
)


def _spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(32), _spd(rng, 32)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


@settings(max_examples=15, deadline=None)
@given(d=st.integers(1, 24), seed=st.integers(0, 1000), commuting=st.booleans())
def test_matches_closed_form_for_commuting_covariances(d, seed, commuting):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) * 2
    a, b = rng.uniform(0.01, 4.0, d), rng.uniform(0.01, 4.0, d)
    q = np.linalg.qr(rng.standard_normal((d, d)))[0] if commuting else np.eye(d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T  # diagonal when q = I, commuting in general
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8, abs=1e-8)


def test_matches_scipy_sqrtm_for_general_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    s1, s2 = _spd(rng, 20), _spd(rng, 20, 3.0)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_small_eigenvalues_of_a_wide_spectrum_count():
    """A power-law spectrum, as Inception features have: eigenvalues spanning 1.7e7 and
    their products with the other covariance 2.8e14. Taking the square roots of those
    products dropped all below D eps of the largest, biasing FID upwards (here by 7e-4
    for identical covariances; by 0.02 at D = 2048 with a 1/i^2 spectrum)."""
    rng = np.random.default_rng(0)
    d = 256
    q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    w = 30.0 * np.arange(1, d + 1) ** -3.0
    zero = np.zeros(d)
    for scale in (1.0, 1.05):
        s1, s2 = (q * w) @ q.T, (q * (scale * w)) @ q.T
        expected = np.sum((np.sqrt(w) - np.sqrt(scale * w)) ** 2)  # commuting: closed form
        assert frechet_distance(zero, s1, zero, s2) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_singular_covariances_are_finite():
    rng = np.random.default_rng(2)
    x1, x2 = rng.standard_normal((10, 50)), rng.standard_normal((10, 50)) + 0.5  # N < D
    m1, c1 = feature_stats(x1)
    m2, c2 = feature_stats(x2)
    fd = frechet_distance(m1, c1, m2, c2)
    assert np.isfinite(fd) and fd > 0
    assert abs(frechet_distance(m1, c1, m1, c1)) < 1e-6


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="sigma"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(2, 60),
    d=st.integers(1, 8),
    offset=st.sampled_from([0.0, 1e4]),
    seed=st.integers(0, 1000),
    data=st.data(),
)
def test_streaming_stats_equal_numpy(n, d, offset, seed, data):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, d)) * rng.uniform(0.5, 3, d) + offset).astype(np.float32)
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=5), label="cuts"))
    stats = RunningStats()
    for chunk in np.split(x, cuts):
        stats.update(chunk)
    x64 = x.astype(np.float64)
    assert stats.count == n
    np.testing.assert_allclose(stats.mean, x64.mean(0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(stats.cov, np.cov(x64, rowvar=False).reshape(d, d), rtol=1e-8, atol=1e-8)


def test_running_stats_rejects_bad_input():
    stats = RunningStats()
    with pytest.raises(ValueError, match="2-D"):
        stats.update(np.zeros(3))
    stats.update(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="columns"):
        stats.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="2 samples"):
        _ = stats.cov


def test_inception_score_known_values():
    k, per = 5, 4
    onehot = np.eye(k)[np.tile(np.arange(k), per)]  # each split sees every class equally
    mean, std = inception_score(onehot, splits=per)
    assert mean == pytest.approx(k) and std == pytest.approx(0.0, abs=1e-12)
    uniform = np.full((20, k), 1.0 / k)
    assert inception_score(uniform, splits=2)[0] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    for n, splits in ((30, 3), (103, 10), (7, 3)):
        p = rng.dirichlet(np.ones(7), size=n)
        scores = []
        for i in range(splits):  # the original code's chunks (np.array_split differs for 103 and 7)
            part = p[i * n // splits:(i + 1) * n // splits]
            py = part.mean(0)
            scores.append(np.exp(np.mean([np.sum(r * (np.log(r) - np.log(py))) for r in part])))
        assert inception_score(p, splits=splits) == pytest.approx((np.mean(scores), np.std(scores)),
                                                                  rel=1e-12)
    with pytest.raises(ValueError, match="softmax"):
        inception_score(rng.standard_normal((10, 3)), splits=2)


def test_stats_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    mu, sigma = rng.standard_normal(6), _spd(rng, 6)
    path = tmp_path / "ref.npz"
    save_stats(path, mu, sigma)
    mu2, sigma2 = load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)


def test_stats_record_image_size_and_count(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.standard_normal(5), _spd(rng, 5)
    for kwargs in ({}, {"image_size": 64}, {"num_images": 50_000},
                   {"image_size": np.int32(32), "num_images": 7}):
        path = tmp_path / "ref.npz"
        save_stats(path, mu, sigma, **kwargs)
        stats = read_stats(path)
        assert isinstance(stats, StatsFile)
        np.testing.assert_array_equal(stats.mu, mu)
        np.testing.assert_array_equal(stats.sigma, sigma)
        assert stats.image_size == kwargs.get("image_size")
        assert stats.num_images == kwargs.get("num_images")
        assert type(stats.image_size) in (int, type(None)), kwargs  # plain ints, not numpy
        with np.load(path) as data:
            assert sorted(data.files) == sorted(["mu", "sigma", *kwargs])
            for key in kwargs:
                assert data[key].shape == () and data[key].dtype == np.int64
        mu2, sigma2 = load_stats(path)  # the old reader is unchanged
        np.testing.assert_array_equal(mu2, mu)
        np.testing.assert_array_equal(sigma2, sigma)


def test_stats_of_other_tools_read_without_size(tmp_path):
    """Files with only mu and sigma (an older save_stats, ADM's reference batches with
    their extra arrays) still load; the size and count are unknown."""
    rng = np.random.default_rng(5)
    mu, sigma = rng.standard_normal(4), _spd(rng, 4)
    old = tmp_path / "old.npz"
    np.savez(old, mu=mu, sigma=sigma)
    adm = tmp_path / "VIRTUAL_imagenet64_labeled.npz"
    np.savez(adm, arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu, sigma=sigma)
    for path in (old, adm):
        stats = read_stats(path)
        assert stats.image_size is None and stats.num_images is None
        np.testing.assert_array_equal(stats.mu, mu)
        np.testing.assert_array_equal(load_stats(path)[1], sigma)


def test_save_stats_rejects_bad_size_or_count(tmp_path):
    mu, sigma = np.zeros(3), np.eye(3)
    for name, value in (("image_size", 0), ("image_size", -8), ("image_size", 32.0),
                        ("image_size", True), ("num_images", "10"), ("num_images", 0)):
        path = tmp_path / "ref.npz"
        with pytest.raises(ValueError, match=name):
            save_stats(path, mu, sigma, **{name: value})
        assert not path.exists()


def test_read_stats_rejects_malformed_size_or_count(tmp_path):
    mu, sigma = np.zeros(3), np.eye(3)
    for key in ("image_size", "num_images"):
        for i, bad in enumerate((np.array(0), np.array(-64), np.array(64.0), np.array([64]),
                                 np.array(True), np.array("64"))):
            path = tmp_path / f"bad_{key}_{i}.npz"
            np.savez(path, mu=mu, sigma=sigma, **{key: bad})
            with pytest.raises(ValueError, match=f"bad_{key}_{i}.npz.*'{key}'"):
                read_stats(path)
            with pytest.raises(ValueError, match=f"'{key}'"):
                load_stats(path)


def test_load_stats_rejects_malformed_files(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(ValueError, match="nope.npz"):
        load_stats(missing)
    no_sigma = tmp_path / "no_sigma.npz"
    np.savez(no_sigma, mu=np.zeros(3))
    with pytest.raises(ValueError, match="no_sigma.npz.*sigma"):
        load_stats(no_sigma)
    bad_shape = tmp_path / "bad_shape.npz"
    np.savez(bad_shape, mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match="bad_shape.npz"):
        load_stats(bad_shape)
    garbage = tmp_path / "garbage.npz"
    garbage.write_text("not a zip")
    with pytest.raises(ValueError, match="garbage.npz"):
        load_stats(garbage)
    bare = tmp_path / "bare.npy"
    np.save(bare, np.zeros(3))
    with pytest.raises(ValueError, match="bare.npy"):
        load_stats(bare)
    lopsided = tmp_path / "lopsided.npz"  # was symmetrised without a word
    np.savez(lopsided, mu=np.zeros(3), sigma=np.triu(np.ones((3, 3))))
    with pytest.raises(ValueError, match="lopsided.npz.*not symmetric"):
        load_stats(lopsided)
