"""Closed-form few-shot linear probe (big_vision style), for representation quality.

Recipe (REFERENCE §7): whiten each feature with the train split's mean and std, append a
constant bias feature (large, so the ridge penalty barely touches the bias), regress
one-hot targets in {-1, +1} with ridge l2 = 1024 in closed form, predict the argmax,
report top-1 accuracy. The closed form uses whichever Gram matrix is smaller:

    n >= d':  W = (X^T X + l2 I_d')^{-1} X^T Y      (d' x d' system)
    n <  d':  W = X^T (X X^T + l2 I_n)^{-1} Y       (n x n system)

(the two are equal by the push-through identity). With l2 = 0 (plain least squares) both
Gram matrices can be singular (constant features, e.g. a freshly initialised encoder's, or
fewer distinct rows than features), so l2 = 0 takes the minimum-norm least-squares
solution, pinv(X') Y, the limit of both forms as l2 -> 0. Few-shot subsets take exactly ``shots``
examples of every class (REFERENCE §8: the reference code's subset had unequal shots).

Shape glossary: N train examples; M test examples; D feature dim; D' = D + 1 with bias;
K classes.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
from jaxtyping import Float, Int

BIAS_FEATURE = 100.0
STD_EPS = 1e-5


class LinearProbe(NamedTuple):
    mean: Float[np.ndarray, "d"]
    std: Float[np.ndarray, "d"]
    weights: Float[np.ndarray, "d1 k"]  # last row multiplies the bias feature


def select_shots(
    labels: Int[Any, "n"], shots: int, seed: int = 0,
    readable: Callable[[int], bool] | None = None,
) -> Int[np.ndarray, "s"]:
    """Indices of exactly ``shots`` random examples of every class present in ``labels``.

    Returned sorted ascending. ValueError if some class has fewer than ``shots`` examples.
    With ``readable`` (index -> whether its image can be read), a picked example that
    cannot is replaced by another of its class, drawn in a second seeded order, so that
    every class still has exactly ``shots``; the picks are those without ``readable``
    wherever they are readable. ValueError if a class has fewer readable examples.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ValueError(f"shots must be an integer >= 1, got {shots!r}")
    rng = np.random.default_rng(seed)
    spares = np.random.default_rng([seed, 1])  # its own stream: the first picks stay put
    picked = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if idx.size < shots:
            raise ValueError(f"class {c} has only {idx.size} train examples, fewer than shots={shots}")
        pick = rng.choice(idx, size=shots, replace=False)
        if readable is not None:
            ok = [i for i in pick if readable(int(i))]
            if len(ok) < shots:
                for i in spares.permutation(np.setdiff1d(idx, pick)):
                    if readable(int(i)):
                        ok.append(i)
                        if len(ok) == shots:
                            break
            if len(ok) < shots:
                raise ValueError(f"class {c} has only {len(ok)} readable train examples, "
                                 f"fewer than shots={shots}")
            pick = np.asarray(ok, idx.dtype)
        picked.append(pick)
    return np.sort(np.concatenate(picked))


def _design(x: np.ndarray, mean: np.ndarray, std: np.ndarray, bias: float) -> np.ndarray:
    z = (x - mean) / std
    return np.concatenate([z, np.full((z.shape[0], 1), bias)], axis=1)


class NonFiniteFeaturesError(ValueError):
    """Features with NaN or inf: a ridge solve over them gives NaN scores, whose argmax is
    class 0, so the accuracy would read as chance instead of failing."""


def _check_finite(x: np.ndarray, which: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        rows = int(bad.any(axis=1).sum())
        raise NonFiniteFeaturesError(f"{which} features are not finite in {rows} of {x.shape[0]} "
                                     "rows (NaN or inf)")


def fit_probe(
    feats: Float[Any, "n d"],
    labels: Int[Any, "n"],
    num_classes: int,
    *,
    l2: float = 1024.0,
    bias: float = BIAS_FEATURE,
) -> LinearProbe:
    """Whiten, add the bias feature, solve the ridge regression in closed form (float64)."""
    x = np.asarray(feats, np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"feats must be (N, D) and labels (N,), got {x.shape} and {y.shape}")
    if not (np.isfinite(l2) and l2 >= 0):
        # NaN passed 'l2 < 0' and inf did not fail either: NaN weights, every argmax class 0,
        # a chance score instead of an error (as NonFiniteFeaturesError explains).
        raise ValueError(f"l2 must be a finite number >= 0, got {l2}")
    if y.size == 0 or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, num_classes = {num_classes})")
    _check_finite(x, "train")
    mean = x.mean(axis=0)
    std = x.std(axis=0) + STD_EPS
    design = _design(x, mean, std, bias)
    targets = 2.0 * np.eye(num_classes)[y] - 1.0
    n, d1 = design.shape
    if l2 == 0:
        weights = np.linalg.lstsq(design, targets, rcond=None)[0]
    elif n >= d1:
        gram = design.T @ design + l2 * np.eye(d1)
        weights = np.linalg.solve(gram, design.T @ targets)
    else:
        gram = design @ design.T + l2 * np.eye(n)
        weights = design.T @ np.linalg.solve(gram, targets)
    return LinearProbe(mean=mean, std=std, weights=weights)


def predict(probe: LinearProbe, feats: Float[Any, "m d"], bias: float = BIAS_FEATURE) -> Int[np.ndarray, "m"]:
    """Argmax class of the ridge scores."""
    x = np.asarray(feats, np.float64)
    if x.ndim != 2 or x.shape[1] != probe.mean.shape[0]:
        raise ValueError(f"feats must be (M, {probe.mean.shape[0]}), got {x.shape}")
    _check_finite(x, "test")
    return np.argmax(_design(x, probe.mean, probe.std, bias) @ probe.weights, axis=1)


def few_shot_probe(
    train_feats: Float[Any, "n d"],
    train_labels: Int[Any, "n"],
    test_feats: Float[Any, "m d"],
    test_labels: Int[Any, "m"],
    *,
    l2: float = 1024.0,
    shots: int | None = None,
    seed: int = 0,
    num_classes: int | None = None,
) -> float:
    """Top-1 accuracy on the test split of the ridge probe fit on (a ``shots``-per-class subset of) train.

    ``shots=None`` uses the whole train split. ``num_classes`` defaults to 1 + the largest
    label seen in either split.
    """
    train_labels = np.asarray(train_labels)
    test_labels = np.asarray(test_labels)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    if shots is not None:
        idx = select_shots(train_labels, shots, seed)
        train_feats = np.asarray(train_feats)[idx]
        train_labels = train_labels[idx]
    probe = fit_probe(train_feats, train_labels, num_classes, l2=l2)
    test_feats = np.asarray(test_feats)
    if test_labels.shape != (test_feats.shape[0],):
        raise ValueError(
            f"test_labels must be (M,) = ({test_feats.shape[0]},), got {test_labels.shape}"
        )
    return float(np.mean(predict(probe, test_feats) == test_labels))
