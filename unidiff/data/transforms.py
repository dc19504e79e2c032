"""Per-example image transforms: random resized crop, flip, centre crop, scaling.

Everything here is plain numpy + Pillow and runs inside Grain workers. Randomness
comes only from the ``np.random.Generator`` handed in, which the loader seeds from
(seed, global example position), so a transform is a pure function of its inputs.

Shape glossary: H/W source image height/width, C channels, S output side
(``image_size``); crop boxes are (top, left, height, width) in source pixels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from jaxtyping import Float32, UInt8
from PIL import Image

from unidiff.data.errors import DataError

CropBox = tuple[int, int, int, int]

DEFAULT_CROP_AREA = (0.8, 1.0)
DEFAULT_ASPECT = (3.0 / 4.0, 4.0 / 3.0)
# What a loader sees in place of an example whose file could not be decoded.
UNREADABLE: dict[str, Any] = {"unreadable": True}
# Rejection attempts before falling back to a directly constructed feasible box.
_CROP_ATTEMPTS = 10


def check_crop_area(crop_area: tuple[float, float], flag: str = "--crop_area") -> None:
    """Raises DataError unless 0 < lo <= hi <= 1."""
    try:
        lo, hi = (float(v) for v in crop_area)
    except (TypeError, ValueError):
        raise DataError(f"{flag}={crop_area!r}: expected two numbers lo,hi") from None
    if not (0.0 < lo <= hi <= 1.0):
        raise DataError(f"{flag}={crop_area!r}: expected 0 < lo <= hi <= 1")


def sample_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    area_range: tuple[float, float] = DEFAULT_CROP_AREA,
    aspect_range: tuple[float, float] = DEFAULT_ASPECT,
) -> CropBox:
    """Samples an Inception-style crop box (top, left, h, w).

    The area fraction h*w/(H*W) lies in ``area_range`` (up to integer rounding of
    h and w) and w/h in ``aspect_range`` whenever the image shape allows both.
    First a few rejection draws of (area, log-aspect) jointly uniform, as in the
    usual RandomResizedCrop; if all are infeasible, the area is kept and the
    aspect drawn from the feasible interval for that area, so the area range is
    never violated. Where no aspect in range fits that area (a wide image and a
    large area: a 3:2 image at area 0.95 needs w/h >= 1.425), the box takes the
    full height (or, for a tall image, the full width), the fitting aspect
    nearest the range.
    """
    lo, hi = area_range
    a_lo, a_hi = aspect_range
    total = float(height * width)
    log_lo, log_hi = math.log(a_lo), math.log(a_hi)

    def box(area: float, aspect: float) -> CropBox:
        w = int(round(math.sqrt(area * total * aspect)))
        h = int(round(math.sqrt(area * total / aspect)))
        w = min(max(w, 1), width)
        h = min(max(h, 1), height)
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        return top, left, h, w

    for _ in range(_CROP_ATTEMPTS):
        area = rng.uniform(lo, hi)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = math.sqrt(area * total * aspect)
        h = math.sqrt(area * total / aspect)
        if w <= width and h <= height:
            return box(area, aspect)
    area = rng.uniform(lo, hi)
    # w <= W  <=>  aspect <= W^2 / (area*total);  h <= H  <=>  aspect >= area*total / H^2.
    fit_lo, fit_hi = area * total / height**2, width**2 / (area * total)
    feas_lo, feas_hi = max(a_lo, fit_lo), min(a_hi, fit_hi)
    if feas_lo <= feas_hi:
        aspect = math.exp(rng.uniform(math.log(feas_lo), math.log(feas_hi)))
    else:
        # No aspect in range fits this area (a 3:2 image at area 0.95 needs w/h >= 1.425):
        # the fitting aspect nearest the range, i.e. the full height (or width). Clipping
        # the image's own aspect into the range instead gave a box taller than the image,
        # cut to it, which broke the area range as well.
        aspect = fit_lo if fit_lo > a_hi else fit_hi
    return box(area, aspect)


def center_crop_box(height: int, width: int) -> CropBox:
    """The largest centred square."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def crop_and_resize(
    image: UInt8[np.ndarray, "h w c"], box: CropBox, size: int
) -> UInt8[np.ndarray, "s s c"]:
    """Crops ``box`` out of a uint8 image and resizes it to ``size x size`` (bilinear).

    The crop is cut out first (so, unlike Pillow's ``resize(box=...)``, no pixel
    outside the box leaks in through the filter support). Pillow's bilinear filter
    widens its support when shrinking, so downscaling is antialiased.
    """
    top, left, h, w = box
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W, C), got shape {image.shape}")
    crop = np.ascontiguousarray(image[top : top + h, left : left + w])
    if (h, w) == (size, size):
        return crop
    if crop.shape[-1] == 3:
        out = Image.fromarray(crop, mode="RGB").resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(out, dtype=np.uint8)
    planes = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(crop[..., c]), mode="L").resize(
                (size, size), Image.Resampling.BILINEAR
            ),
            dtype=np.uint8,
        )
        for c in range(crop.shape[-1])
    ]
    return np.stack(planes, axis=-1)


def to_unit_range(image: UInt8[np.ndarray, "h w c"]) -> Float32[np.ndarray, "h w c"]:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return image.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def train_image(
    image: UInt8[np.ndarray, "h w c"],
    rng: np.random.Generator,
    size: int,
    crop_area: tuple[float, float] = DEFAULT_CROP_AREA,
    flip: bool = True,
    aspect_range: tuple[float, float] = DEFAULT_ASPECT,
) -> Float32[np.ndarray, "s s c"]:
    """Random resized crop + optional horizontal flip, scaled to [-1, 1]."""
    box = sample_crop_box(rng, image.shape[0], image.shape[1], crop_area, aspect_range)
    out = crop_and_resize(image, box, size)
    # Draw the coin even when flipping is off so the crop stream does not depend on it.
    if rng.random() < 0.5 and flip:
        out = out[:, ::-1]
    return to_unit_range(out)


def eval_image(image: UInt8[np.ndarray, "h w c"], size: int) -> Float32[np.ndarray, "s s c"]:
    """Centre crop + resize, scaled to [-1, 1]."""
    out = crop_and_resize(image, center_crop_box(image.shape[0], image.shape[1]), size)
    return to_unit_range(out)


def train_latent(
    latent: Float32[np.ndarray, "h w c"], rng: np.random.Generator, flip: bool
) -> Float32[np.ndarray, "h w c"]:
    """Latents get no crop or rescaling; only an optional horizontal flip."""
    out = np.asarray(latent, dtype=np.float32)
    if rng.random() < 0.5 and flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


@dataclasses.dataclass(frozen=True)
class ExampleTransform:
    """Maps (global position, source element) -> loader element.

    The output always has the same structure so that Grain can batch it:
    ``{"image": float32 (S,S,C), "label": int32, "valid": bool}``. An unreadable
    example (``None`` or the ``UNREADABLE`` marker) becomes a zero image with
    ``valid=False``; the loader drops and counts those.
    """

    seed: int
    train: bool
    image_size: int
    channels: int
    crop_area: tuple[float, float] = DEFAULT_CROP_AREA
    flip: bool = True
    latent: bool = False

    def rng(self, index: int) -> np.random.Generator:
        # The constant tags this stream, so it never coincides with other uses of `seed`.
        return np.random.default_rng([self.seed, 0xDA7A, int(index)])

    def __call__(self, index: int, element: Any) -> dict[str, Any]:
        if element is None or element.get("unreadable", False):
            return {
                "image": np.zeros((self.image_size, self.image_size, self.channels), np.float32),
                "label": np.int32(0),
                "valid": np.bool_(False),
            }
        image = element["image"]
        if self.latent:
            if self.train:
                image = train_latent(image, self.rng(index), self.flip)
            else:
                image = np.ascontiguousarray(image, dtype=np.float32)
        elif self.train:
            image = train_image(image, self.rng(index), self.image_size, self.crop_area, self.flip)
        else:
            image = eval_image(image, self.image_size)
        return {"image": image, "label": np.int32(element["label"]), "valid": np.bool_(True)}
