"""Multi-head self-attention with an optional MDT relative position bias.

The qkv projection is one Dense(3W) and the output projection one Dense(W)
(``layers.Dense``: ``qkv/w`` (W, 3W), ``qkv/b``, ``proj/w``, ``proj/b``), both on
(B*N, W) rows. The qkv output is transposed once to (3, B, H, N, D), so q, k, v are
heads-major and the attention matmuls need no further transposes, forward or
backward; the (B, H, N, D) output goes back to (B*N, W) rows, once, for the output
projection. In the backward pass the same two transposes run in reverse, and the
projections' input- and weight-gradient dots read their results without copies of
their own. (Applying the projections as einsums over a heads-major view of the
weights instead made XLA:CPU transpose activations and gradients inside the
projection dots: in one-process A/Bs of the S/4 DiT-recipe step at batch 4, the qkv
einsum cost 1.2% and the output-projection einsum 2.3%; benchmarks/README.md.) The
softmax is normalised after the PV matmul (divide the (B, H, N, D) output, not the
(B, H, N, N) probabilities). Logits, exp and the normaliser are float32 for bfloat16
inputs too. Reading q, k, v as slices of the last axis of the (B, N, 3W) output, and
``jax.nn.dot_product_attention``'s (B, N, H, D) layout, were slower
(benchmarks/README.md).

Head groups: on CPU the heads are processed as two independent groups (``head_groups``,
default ``default_head_groups()``), each with its own logits, softmax and PV matmul,
and the outputs are concatenated. The result is the same function; the split is for
XLA:CPU, whose YNNPACK batched matmul runs on a single thread when each matrix has at
most 256 rows (every attention matmul at 256-260 tokens, at any batch size), and whose
thunk executor runs independent ops on separate cores, so two groups keep both cores of
a 2-core machine busy through attention. Accelerators get one group. A relative
position bias shared by the whole batch is added with ``layers.add_batch_shared``, whose
gradient (a sum over the batch) is a matmul with a ones vector, because XLA:CPU emitted
that reduction, fused with the groups' concatenation, 20x slower. Measurements: benchmarks/README.md.

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

from unidiff.models.layers import add_batch_shared, dense

rel_pos_init = hk.initializers.TruncatedNormal(stddev=0.02)

CPU_HEAD_GROUPS = 2


def default_head_groups() -> int:
    """Independent head groups for the current default backend: 2 on CPU, else 1."""
    return CPU_HEAD_GROUPS if jax.default_backend() == "cpu" else 1


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
    """Multi-head self-attention (fused qkv with bias, output projection).

    ``head_groups``: the heads are computed in this many independent groups (at most
    ``num_heads``; None = ``default_head_groups()``). Any value gives the same
    function and the same parameters.
    """

    def __init__(self, num_heads: int, rel_pos_grid: int | None = None, name: str = "attn",
                 head_groups: int | None = None):
        if head_groups is not None and head_groups < 1:
            raise ValueError(f"head_groups: expected >= 1, got {head_groups}")
        super().__init__(name=name)
        self.num_heads = num_heads
        self.rel_pos_grid = rel_pos_grid
        self.head_groups = head_groups

    def __call__(
        self, x: Float[Array, "b n w"], index: Int[Array, "bb n n"] | None = None
    ) -> Float[Array, "b n w"]:
        b, n, w = x.shape
        h = self.num_heads
        if w % h:
            raise ValueError(f"num_heads: width {w} is not divisible by {h} heads")
        d = w // h
        qkv = dense(3 * w, "qkv")(x).reshape(b, n, 3, h, d)
        qkv = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # (3, B, H, N, D)
        # Scaling q (B*N*W values) is cheaper than scaling the logits (B*H*N*N).
        q = qkv[0] * (1.0 / np.sqrt(d)).astype(x.dtype)  # (B, H, N, D)
        k, v = qkv[1], qkv[2]

        bias = None
        if self.rel_pos_grid is not None:
            if index is None:
                raise ValueError("index: relative position bias needs the bias index")
            g = self.rel_pos_grid
            table = hk.get_parameter("rel_pos_bias", ((2 * g - 1) ** 2, h), x.dtype, init=rel_pos_init)
            table = jnp.concatenate([table, jnp.zeros((1, h), table.dtype)], axis=0)
            bias = jnp.moveaxis(jnp.take(table, index, axis=0), -1, 1)  # (bb, H, N, N)

        groups = min(h, self.head_groups or default_head_groups())
        bounds = [i * h // groups for i in range(groups + 1)]
        outs = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):  # static slices of the heads axis
            outs.append(_attend(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi],
                                None if bias is None else bias[:, lo:hi], x.dtype))
        out = outs[0] if groups == 1 else jnp.concatenate(outs, axis=1)  # (B, H, N, D)

        out = jnp.transpose(out, (0, 2, 1, 3)).reshape(b, n, w)  # heads concatenated per token
        return dense(w, "proj")(out)


def _attend(
    q: Float[Array, "b g n d"], k: Float[Array, "b g n d"], v: Float[Array, "b g n d"],
    bias: Float[Array, "bb g n n"] | None, dtype,
) -> Float[Array, "b g n d"]:
    """Softmax attention of one group of G heads; q is already scaled by 1/sqrt(D)."""
    low = q.dtype != jnp.float32
    logits = (_qk_low if low else _qk)(q, k)
    if bias is not None:
        bias = bias.astype(jnp.float32)
        logits = logits + bias if bias.shape[0] > 1 else add_batch_shared(logits, bias[0])
    # The max only guards exp against overflow; the result does not depend on it.
    e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    out = (_pv_low if low else _pv)(e.astype(v.dtype), v)
    return (out / jnp.sum(e, axis=-1, keepdims=True)).astype(dtype)


# The two attention matmuls take low-precision operands (bfloat16) and give float32
# results, so the softmax runs in float32. Under plain autodiff their float32 cotangents
# made the four backward matmuls float32 too, a third of a bfloat16 step's matmuls
# (50 of 136 in a UMD step): the _low versions cast the cotangent to the operands' dtype
# first, as autodiff does for every other bfloat16 layer, and accumulate in float32.
# Forward values are the same; float32 models use the plain functions.
def _low_einsum(spec: str, a: Array, b: Array, dtype) -> Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(dtype)


def _matmul_pair(spec: str, lhs_grad: str, rhs_grad: str):
    """(plain, low) versions of the einsum ``spec`` of two operands with a float32 result.
    ``low``'s backward casts the cotangent g to the operands' dtype before its two
    matmuls: ``lhs_grad`` contracts (g, rhs) and ``rhs_grad`` (g, lhs)."""

    def plain(a, b):
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)

    @jax.custom_vjp
    def low(a, b):
        return plain(a, b)

    def bwd(res, g):
        a, b = res
        g = g.astype(a.dtype)
        return _low_einsum(lhs_grad, g, b, a.dtype), _low_einsum(rhs_grad, g, a, b.dtype)

    low.defvjp(lambda a, b: (plain(a, b), (a, b)), bwd)
    return plain, low


_qk, _qk_low = _matmul_pair("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd", "bhqk,bhqd->bhkd")
_pv, _pv_low = _matmul_pair("bhqk,bhkd->bhqd", "bhqd,bhkd->bhqk", "bhqd,bhqk->bhkd")

