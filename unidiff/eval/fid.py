"""FID and Inception Score from features: streaming statistics, Fréchet distance, IS, stats files.

Everything here is float64 numpy (no JAX), so the statistics of 50k x 2048 features are
accumulated exactly enough and the matrix square root needs no scipy:
trace(sqrtm(s1 @ s2)) = the sum of the singular values of sqrt(s1) @ sqrt(s2) (the
eigenvalues of s1 @ s2 are those of sqrt(s1) @ s2 @ sqrt(s1), the squared singular
values), so ``numpy.linalg.eigh`` and ``svd`` suffice.

Reference statistics files are ``.npz`` with ``mu`` (d,) and ``sigma`` (d, d), and, when
the writer knew them, ``image_size`` (the side of the square images the features were
computed from) and ``num_images`` (how many), both 0-d int64. FID of images of one size
against statistics of another is meaningless (the Inception resize to 299x299 blurs them
differently), so the size is recorded for the reader to check; files of other tools (e.g.
ADM's reference batches) have only ``mu`` and ``sigma`` and still load, with the size unknown.

Shape glossary: N number of samples; D feature dimension (2048 for Inception pool); K classes.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, NamedTuple

import numpy as np
from jaxtyping import Float

from unidiff.outputs import atomic_write


class RunningStats:
    """Streaming mean and unbiased covariance (like ``numpy.cov(x, rowvar=False)``).

    Accumulates, in float64, the sum and the sum of outer products of ``x - shift`` where
    ``shift`` is the first batch's mean: shifting keeps the cancellation in
    ``S - n mu mu^T`` small when features have a large mean. The object is local state owned
    by the caller (one per evaluation), not a global.
    """

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.count = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, feats: Float[Any, "n d"]) -> "RunningStats":
        x = np.asarray(feats, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"feats must be 2-D (N, D), got shape {x.shape}")
        if self.dim is not None and x.shape[1] != self.dim:
            raise ValueError(f"feats must have D = {self.dim} columns, got shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("feats contain non-finite values")
        if x.shape[0] == 0:
            return self
        if self._shift is None:
            self.dim = x.shape[1]
            self._shift = x.mean(axis=0)
            self._sum = np.zeros(self.dim)
            self._outer = np.zeros((self.dim, self.dim))
        xc = x - self._shift
        self._sum += xc.sum(axis=0)
        self._outer += xc.T @ xc
        self.count += x.shape[0]
        return self

    @property
    def mean(self) -> Float[np.ndarray, "d"]:
        if self.count == 0:
            raise ValueError("RunningStats.mean needs at least one sample")
        return self._shift + self._sum / self.count

    @property
    def cov(self) -> Float[np.ndarray, "d d"]:
        if self.count < 2:
            raise ValueError(f"RunningStats.cov needs at least 2 samples, got {self.count}")
        m = self._sum / self.count
        return (self._outer - self.count * np.outer(m, m)) / (self.count - 1)


def feature_stats(feats: Float[Any, "n d"]) -> tuple[Float[np.ndarray, "d"], Float[np.ndarray, "d d"]]:
    """(mean, unbiased covariance) of a full feature array."""
    stats = RunningStats().update(feats)
    return stats.mean, stats.cov


def _check_stats(mu: np.ndarray, sigma: np.ndarray, which: str) -> None:
    if mu.ndim != 1:
        raise ValueError(f"{which}: mu must be 1-D (D,), got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{which}: sigma must be (D, D) = {(mu.shape[0],) * 2}, got {sigma.shape}")


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    # A singular covariance (fewer samples than dimensions) has eigenvalues of either
    # sign at round-off level: negative ones are 0.
    return (v * np.sqrt(np.maximum(w, 0.0))) @ v.T


def frechet_distance(
    mu1: Float[Any, "d"], sigma1: Float[Any, "d d"], mu2: Float[Any, "d"], sigma2: Float[Any, "d d"]
) -> float:
    """||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2)), in float64.

    Negative eigenvalues at round-off level (covariances of fewer samples than
    dimensions are singular) are set to 0 rather than producing NaN or complex parts.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    _check_stats(mu1, s1, "first statistics")
    _check_stats(mu2, s2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    # tr sqrtm(s1 s2) = the sum of the singular values of sqrt(s1) sqrt(s2). Taking
    # the eigenvalues of sqrt(s1) s2 sqrt(s1) instead squares them: their round-off
    # floor then hides every direction below sqrt(D eps) of the largest, about 7e-7
    # at D = 2048, which biased FID upwards by 0.02 for a power-law spectrum.
    tr_covmean = np.linalg.svd(_psd_sqrt(s1) @ _psd_sqrt(s2), compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def inception_score(probs: Float[Any, "n k"], splits: int = 10) -> tuple[float, float]:
    """Inception Score: mean and std over ``splits`` chunks of exp(E_x KL(p(y|x) || p(y))).

    ``probs`` are class probabilities (rows summing to 1), e.g. ``softmax(logits_unbiased)``
    of the FID Inception's 1008 classes. Chunk i is rows ``i * N // splits`` up to
    ``(i + 1) * N // splits``, as in the original code.
    """
    p = np.asarray(probs, np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (N, K), got shape {p.shape}")
    if not isinstance(splits, (int, np.integer)) or splits < 1 or splits > p.shape[0]:
        raise ValueError(f"splits must be an integer in [1, N = {p.shape[0]}], got {splits!r}")
    if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probs must be non-negative with rows summing to 1 (apply softmax first)")
    n, scores = p.shape[0], []
    for i in range(splits):
        # The original's boundaries i * N // splits: np.array_split puts the longer chunks first.
        chunk = p[i * n // splits:(i + 1) * n // splits]
        marginal = chunk.mean(axis=0, keepdims=True)
        # 0 * log 0 = 0: only classes with p > 0 contribute.
        ratio = np.where(chunk > 0, chunk / np.where(marginal > 0, marginal, 1.0), 1.0)
        kl = np.sum(chunk * np.log(ratio), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# Optional integer entries of a statistics file, beside mu and sigma.
_META_KEYS = ("image_size", "num_images")


class StatsFile(NamedTuple):
    """The contents of a statistics ``.npz``; ``None`` for an optional key the file lacks."""

    mu: Float[np.ndarray, "d"]
    sigma: Float[np.ndarray, "d d"]
    image_size: int | None  # side of the square images the features came from
    num_images: int | None  # how many images the statistics are of


def _check_positive_int(value: Any, name: str) -> int:
    # bool is an int subclass: True would be stored as size 1 without a word.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def save_stats(
    path: str | os.PathLike,
    mu: Float[Any, "d"],
    sigma: Float[Any, "d d"],
    *,
    image_size: int | None = None,
    num_images: int | None = None,
) -> None:
    """Write statistics as ``.npz``: ``mu`` and ``sigma`` (float64), and ``image_size`` and
    ``num_images`` (0-d int64) when given. ValueError naming the argument when they are not
    positive integers."""
    meta = {}
    for name, value in (("image_size", image_size), ("num_images", num_images)):
        if value is not None:
            meta[name] = np.asarray(_check_positive_int(value, name), np.int64)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    _check_stats(mu, sigma, f"statistics for {os.fspath(path)!r}")
    with atomic_write(os.fspath(path)) as f:
        np.savez(f, mu=mu, sigma=sigma, **meta)


def _read_meta(data: np.lib.npyio.NpzFile, key: str, source: str) -> int | None:
    if key not in data.files:
        return None
    try:
        value = data[key]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"statistics file {source!r} has an unreadable {key!r} ({e})") from e
    # A float or an array here is not what save_stats writes: refuse rather than round,
    # since the size is what decides whether two statistics may be compared at all.
    if value.shape != () or value.dtype.kind not in "iu" or value <= 0:
        raise ValueError(f"statistics file {source!r}: {key!r} must be a positive scalar "
                         f"integer, got {value.dtype} {value.shape} {value.tolist()!r}")
    return int(value)


def read_stats(path: str | os.PathLike) -> StatsFile:
    """Read a statistics ``.npz``: ``mu``, ``sigma`` and the optional ``image_size`` and
    ``num_images`` (``None`` when absent); ValueError naming the file (and key) when malformed."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise ValueError(f"statistics file {source!r} not found")
    try:
        data = np.load(source, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"statistics file {source!r} is not a readable .npz ({e})") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"statistics file {source!r} is not an .npz archive with 'mu' and 'sigma'")
    with data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(
                f"statistics file {source!r} lacks key(s) {missing}; expected 'mu' (D,) and "
                f"'sigma' (D, D), found {sorted(data.files)}"
            )
        try:
            mu = np.asarray(data["mu"], np.float64)
            sigma = np.asarray(data["sigma"], np.float64)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f"statistics file {source!r} has an unreadable entry ({e})") from e
        image_size, num_images = (_read_meta(data, key, source) for key in _META_KEYS)
    _check_stats(mu, sigma, f"statistics file {source!r}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"statistics file {source!r} contains non-finite values")
    # A covariance is symmetric: anything else (a transposed or mixed-up array) would be
    # quietly symmetrised by the distance.
    scale = max(float(np.max(np.abs(sigma), initial=0.0)), np.finfo(np.float64).tiny)
    if np.max(np.abs(sigma - sigma.T), initial=0.0) > 1e-6 * scale:
        raise ValueError(f"statistics file {source!r}: 'sigma' is not symmetric, so not a covariance")
    return StatsFile(mu, sigma, image_size, num_images)


def load_stats(path: str | os.PathLike) -> tuple[Float[np.ndarray, "d"], Float[np.ndarray, "d d"]]:
    """Read ``mu``, ``sigma`` from an ``.npz`` (``read_stats`` without the optional entries);
    ValueError naming the file when malformed."""
    stats = read_stats(path)
    return stats.mu, stats.sigma
