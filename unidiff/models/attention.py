"""Multi-head self-attention with an optional MDT relative position bias.

The qkv projection is one fused Dense(3W) whose output is reshaped straight into the
(B, N, H, D) layout ``jax.nn.dot_product_attention`` takes, so no transposes are
needed; logits and softmax run in float32 inside that function even for bfloat16
inputs.

Relative position bias (MDT, BEiT-style): each block owns a table of (2g-1)^2 x H
learned values for a g x g grid; token pair (i, j) reads entry
(dr + g - 1) * (2g - 1) + (dc + g - 1) for its row/column offsets (dr, dc). When
tokens are dropped, the (L, L) index is gathered by the kept ids, so the bias of a
K-token sequence is built directly at (K, K). Extra tokens (CLS, conditioning) get a
zero bias via one extra all-zero table row at index (2g-1)^2.

Shape glossary: B batch, N tokens in the sequence (extras + patch tokens), E = number
of extra tokens in front, L = g*g patch tokens, K kept tokens, W width, H heads,
D = W / H head dim, R = (2g-1)^2 table entries.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from unidiff.models.layers import dense

rel_pos_init = hk.initializers.TruncatedNormal(stddev=0.02)


def rel_pos_index(grid: int) -> np.ndarray:
    """(L, L) int32 index into the (2g-1)^2 table for every pair of raster tokens."""
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    dr = rows[:, None] - rows[None, :] + grid - 1
    dc = cols[:, None] - cols[None, :] + grid - 1
    return (dr * (2 * grid - 1) + dc).astype(np.int32)


def bias_index(
    grid: int, num_extra: int, ids_keep: Int[Array, "b k"] | None = None
) -> Int[Array, "bb n n"]:
    """Index of every (query, key) pair of a sequence [E extras, patch tokens] into the
    table extended by a zero row. Shape (1, N, N) when all L tokens are present in
    raster order, (B, N, N) for the kept tokens ``ids_keep``. Computed once per forward
    and shared by every block."""
    index = jnp.asarray(rel_pos_index(grid))
    if ids_keep is None:
        index = index[None]
    else:
        index = index[ids_keep[:, :, None], ids_keep[:, None, :]]
    if num_extra:
        zero_row = (2 * grid - 1) ** 2
        pad = ((0, 0), (num_extra, 0), (num_extra, 0))
        index = jnp.pad(index, pad, constant_values=zero_row)
    return index


class Attention(hk.Module):
    """Multi-head self-attention (fused qkv with bias, output projection)."""

    def __init__(self, num_heads: int, rel_pos_grid: int | None = None, name: str = "attn"):
        super().__init__(name=name)
        self.num_heads = num_heads
        self.rel_pos_grid = rel_pos_grid

    def __call__(
        self, x: Float[Array, "b n w"], index: Int[Array, "bb n n"] | None = None
    ) -> Float[Array, "b n w"]:
        b, n, w = x.shape
        h = self.num_heads
        # split (not indexing): its backward is one concatenate of dq, dk, dv, where
        # three indexings would each pad a zero (b, n, 3W) buffer and then add them.
        q, k, v = (t.reshape(b, n, h, w // h) for t in jnp.split(dense(3 * w, "qkv")(x), 3, axis=-1))
        bias = None
        if self.rel_pos_grid is not None:
            if index is None:
                raise ValueError("index: relative position bias needs the bias index")
            g = self.rel_pos_grid
            table = hk.get_parameter("rel_pos_bias", ((2 * g - 1) ** 2, h), x.dtype, init=rel_pos_init)
            table = jnp.concatenate([table, jnp.zeros((1, h), table.dtype)], axis=0)
            bias = jnp.moveaxis(jnp.take(table, index, axis=0), -1, 1)  # (bb, H, N, N)
        out = jax.nn.dot_product_attention(q, k, v, bias=bias)
        return dense(w, "proj")(out.reshape(b, n, w))
