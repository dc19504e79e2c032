"""Images <-> patch tokens, in raster order (row-major over the patch grid).

Patch ``(i, j)`` of the ``gh x gw`` grid is token ``i * gw + j`` and holds the pixels
``[i*p:(i+1)*p, j*p:(j+1)*p]`` flattened in (row, column, channel) order, so a linear
layer on tokens is exactly a conv with kernel = stride = p.

Shape glossary: B batch, H/W image size, C channels, p patch size, L = (H/p)(W/p)
tokens, P = p*p*C values per patch.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float


def _check_divides(size: int, patch_size: int, what: str) -> None:
    if patch_size < 1 or size % patch_size:
        raise ValueError(
            f"patch_size={patch_size} must be >= 1 and divide the image {what} {size}"
        )


def patchify(images: Float[Array, "b h w c"], patch_size: int) -> Float[Array, "b l p"]:
    """(B, H, W, C) -> (B, L, p*p*C) tokens in raster order."""
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, H, W, C), got {images.shape}")
    b, h, w, c = images.shape
    _check_divides(h, patch_size, "height")
    _check_divides(w, patch_size, "width")
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # b, gh, gw, p, p, c
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(
    tokens: Float[Array, "b l p"], patch_size: int, height: int, width: int
) -> Float[Array, "b h w c"]:
    """Inverse of :func:`patchify`: (B, L, p*p*C) -> (B, H, W, C)."""
    _check_divides(height, patch_size, "height")
    _check_divides(width, patch_size, "width")
    if tokens.ndim != 3:
        raise ValueError(f"tokens must have shape (B, L, p*p*C), got {tokens.shape}")
    b, l, d = tokens.shape
    p = patch_size
    gh, gw = height // p, width // p
    if l != gh * gw or d % (p * p):
        raise ValueError(
            f"tokens of shape {tokens.shape} do not tile a {height}x{width} image "
            f"with patch_size={p} (expected L={gh * gw} and a multiple of {p * p} values)"
        )
    c = d // (p * p)
    x = tokens.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


def grid_size(image_size: int, patch_size: int) -> int:
    """Patches per side for a square image."""
    _check_divides(image_size, patch_size, "size")
    return image_size // patch_size
