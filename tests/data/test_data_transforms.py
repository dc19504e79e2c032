"""Crop sampler, resize, scaling and the per-example transform."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unidiff.data import transforms as T


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(8, 64),
    aspect_u=st.floats(0.0, 1.0),
    lo=st.floats(0.05, 1.0),
    width_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
)
def test_crop_box_area_and_aspect_in_range(h, aspect_u, lo, width_frac, seed):
    # Image shapes whose own aspect is in range, so every area in range is feasible.
    w_min, w_max = math.ceil(0.75 * h), math.floor(4 * h / 3)
    w = w_min + int(round(aspect_u * (w_max - w_min)))
    hi = lo + (1.0 - lo) * width_frac
    rng = np.random.default_rng(seed)
    for _ in range(20):
        top, left, ch, cw = T.sample_crop_box(rng, h, w, (lo, hi))
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch >= 1 and cw >= 1
        # Rounding h*, w* to integers moves the area by at most (h* + w*)/2 + 1/4 pixels.
        tol = (0.5 * (h + w) + 0.25) / (h * w)
        frac = ch * cw / (h * w)
        assert lo - tol <= frac <= hi + tol
        # The unrounded aspect w*/h* lies in [3/4, 4/3] and |cw - w*|, |ch - h*| <= 1/2.
        smallest_aspect = (cw - 0.5) / (ch + 0.5)
        largest_aspect = (cw + 0.5) / (ch - 0.5)
        assert smallest_aspect <= 4.0 / 3.0 + 1e-9 and largest_aspect >= 0.75 - 1e-9


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(8, 64),
    stretch=st.floats(1.0, 4.0),
    tall=st.booleans(),
    lo=st.floats(0.05, 1.0),
    width_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
)
def test_crop_box_keeps_the_area_range_on_images_outside_the_aspect_range(h, stretch, tall, lo,
                                                                          width_frac, seed):
    """A 3:2 image at area (0.95, 1) gave boxes of area 0.917-0.948 and aspect
    1.375-1.42: the image's aspect clipped to 4/3, then the box cut to the image."""
    long_side = max(h, int(round(h * 4 / 3 * stretch)))
    H, W = (long_side, h) if tall else (h, long_side)
    hi = lo + (1.0 - lo) * width_frac
    # Even the smallest area of the range needs an aspect beyond 4/3 (or below 3/4).
    infeasible = lo * max(H, W) / min(H, W) > 4 / 3
    rng = np.random.default_rng(seed)
    for _ in range(20):
        top, left, ch, cw = T.sample_crop_box(rng, H, W, (lo, hi))
        assert 0 <= top and top + ch <= H and 0 <= left and left + cw <= W and ch >= 1 and cw >= 1
        tol = (0.5 * (H + W) + 0.25) / (H * W)
        assert lo - tol <= ch * cw / (H * W) <= hi + tol
        if infeasible:  # the nearest fitting aspect: the whole short side
            assert (cw == W) if tall else (ch == H)


def test_crop_box_covers_area_range():
    """The sampler explores the whole area range, not one corner of it."""
    rng = np.random.default_rng(0)
    fracs = [np.prod(T.sample_crop_box(rng, 64, 64, (0.3, 0.9))[2:]) / 64**2 for _ in range(400)]
    assert min(fracs) < 0.35 and max(fracs) > 0.85


def test_crop_box_elongated_image_stays_inside():
    rng = np.random.default_rng(1)
    for _ in range(50):
        top, left, ch, cw = T.sample_crop_box(rng, 8, 80, (0.9, 1.0))
        assert top + ch <= 8 and left + cw <= 80


def test_center_crop_box():
    assert T.center_crop_box(10, 16) == (0, 3, 10, 10)
    assert T.center_crop_box(17, 12) == (2, 0, 12, 12)


def test_crop_and_resize_identity_and_crop():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    np.testing.assert_array_equal(T.crop_and_resize(img, (2, 3, 6, 6), 6), img[2:8, 3:9])



def _antialiased_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Triangle filter widened by the scale factor when shrinking, rows normalised."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    dist = np.abs((np.arange(n_in)[None, :] + 0.5) - centres[:, None]) / support
    w = np.clip(1.0 - dist, 0.0, None)
    return w / w.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("size", [6, 21])
def test_crop_and_resize_matches_antialiased_bilinear(channels, size):
    rng = np.random.default_rng(channels)
    img = rng.integers(0, 256, size=(16, 20, channels), dtype=np.uint8)
    box = (1, 3, 12, 16)  # top, left, h, w
    out = T.crop_and_resize(img, box, size)
    assert out.shape == (size, size, channels) and out.dtype == np.uint8
    crop = img[1:13, 3:19].astype(np.float64)
    rows, cols = _antialiased_bilinear_matrix(12, size), _antialiased_bilinear_matrix(16, size)
    want = np.einsum("ih,hwc,jw->ijc", rows, crop, cols)
    np.testing.assert_allclose(out, want, atol=1.01)


def test_to_unit_range_formula():
    x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    y = T.to_unit_range(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x.astype(np.float64) / 127.5 - 1.0, atol=1e-6)
    assert y.min() == -1.0 and y.max() == 1.0


def test_example_transform_deterministic_per_seed_and_index():
    rng = np.random.default_rng(0)
    ex = {"image": rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), "label": np.int32(3)}
    t = T.ExampleTransform(seed=5, train=True, image_size=16, channels=3)
    a, b = t(7, ex), t(7, ex)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["image"].shape == (16, 16, 3) and a["label"] == 3 and a["valid"]
    assert -1.0 <= a["image"].min() and a["image"].max() <= 1.0
    others = [t(i, ex)["image"] for i in range(8, 12)]
    assert any(not np.array_equal(a["image"], o) for o in others)
    t2 = T.ExampleTransform(seed=6, train=True, image_size=16, channels=3)
    assert not np.array_equal(a["image"], t2(7, ex)["image"])


def test_example_transform_eval_and_unreadable():
    img = np.arange(20 * 24 * 3, dtype=np.int64).reshape(20, 24, 3).astype(np.uint8)
    t = T.ExampleTransform(seed=0, train=False, image_size=20, channels=3)
    out = t(0, {"image": img, "label": np.int32(1)})
    np.testing.assert_allclose(out["image"], img[:, 2:22].astype(np.float32) / 127.5 - 1, atol=1e-6)
    bad = t(1, None)
    assert not bad["valid"] and bad["image"].shape == (20, 20, 3)


def test_flip_toggle():
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 1), dtype=np.uint8)
    base = T.to_unit_range(img)
    no_flip = [T.train_image(img, np.random.default_rng(s), 8, (1.0, 1.0), flip=False) for s in range(16)]
    assert all(np.array_equal(o, base) for o in no_flip)
    with_flip = [T.train_image(img, np.random.default_rng(s), 8, (1.0, 1.0), flip=True) for s in range(16)]
    flipped = [np.array_equal(o, base[:, ::-1]) for o in with_flip]
    assert all(f or np.array_equal(o, base) for f, o in zip(flipped, with_flip))
    # Half of the images are mirrored: 2,000 seeded draws give 1,000 +- 22 (binomial
    # std), so [880, 1120] holds at 5.4 std, and a rate of 0.45 or 0.25 falls outside.
    draws = sum(np.array_equal(T.train_image(img, np.random.default_rng(s), 8, (1.0, 1.0),
                                             flip=True), base[:, ::-1]) for s in range(2000))
    assert 880 <= draws <= 1120, draws
    latent = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    draws = sum(np.array_equal(T.train_latent(latent, np.random.default_rng(s), flip=True),
                               latent[:, ::-1]) for s in range(2000))
    assert 880 <= draws <= 1120, draws


@pytest.mark.parametrize("bad", [(0.0, 1.0), (0.9, 0.8), (0.5, 1.2), ("a",)])
def test_check_crop_area_rejects(bad):
    with pytest.raises(T.DataError, match="--crop_area"):
        T.check_crop_area(bad)


def test_full_area_crop_is_whole_square_image():
    rng = np.random.default_rng(3)
    for _ in range(10):
        assert T.sample_crop_box(rng, 16, 16, (1.0, 1.0)) == (0, 0, 16, 16)
