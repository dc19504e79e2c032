"""Transformer blocks and the output head.

* ``AdaLNBlock`` (DiT's AdaLN-Zero): shift/scale/gate for attention and MLP from a
  zero-initialised Dense(6W) of the conditioning vector, so every block starts as the
  identity; LayerNorm with or without affine; tanh-GELU MLP.
* ``ViTBlock``: plain pre-norm block for MAE mode (conditioning travels as a token).
* ``FinalLayer``: LayerNorm, shift/scale from cond (no gate; skipped in MAE mode),
  linear to p*p*out_channels per token, zero-initialised.

Every block passes its input through ``materialize_cotangent`` (identity forward and
backward; see there): it keeps XLA from re-fusing the whole residual-stream gradient
chain into every later consumer, which made the backward pass of deep unmasked models
quadratic in depth on XLA:CPU.

Shape glossary: B batch, N tokens, W block width, C_w conditioning width,
O = p*p*out_channels outputs per token, index = relative-position bias index.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from unidiff.models.attention import Attention
from unidiff.models.layers import LayerNorm, dense


@jax.custom_vjp
def materialize_cotangent(x: Float[Array, "..."]) -> Float[Array, "..."]:
    """Identity. Its backward pass is the identity too, behind an optimization barrier.

    Why: in the backward pass the residual-stream gradient of block l is the gradient
    of block l+1 plus elementwise LayerNorm-backward terms. XLA fuses elementwise
    producers into each of their consumers, so without a barrier every consumer of
    that gradient (the transposes feeding the weight-gradient matmuls, the LayerNorm
    reductions) recomputed the whole chain from the top of the network: on XLA:CPU a
    16-block S/4 step at 64x64 spent 55% of its time in such fusions (benchmarks/
    step_throughput.py; issue 6). The barrier makes the gradient a real buffer at every
    block boundary. (On CPU the train step also keeps XLA from expanding the barriers
    away before fusion, see ``unidiff.train.step``.)
    """
    return x


def _materialize_fwd(x):
    return x, None


def _materialize_bwd(_, g):
    return (jax.lax.optimization_barrier(g),)


materialize_cotangent.defvjp(_materialize_fwd, _materialize_bwd)


class Mlp(hk.Module):
    """Dense(hidden) -> tanh-GELU -> Dense(W)."""

    def __init__(self, hidden: int, name: str = "mlp"):
        super().__init__(name=name)
        self.hidden = hidden

    def __call__(self, x: Float[Array, "b n w"]) -> Float[Array, "b n w"]:
        h = jax.nn.gelu(dense(self.hidden, "fc1")(x), approximate=True)
        return dense(x.shape[-1], "fc2")(h)


class AdaLNBlock(hk.Module):
    """x + gate_a * attn(mod(LN(x))); then x + gate_m * mlp(mod(LN(x)))."""

    def __init__(
        self, num_heads: int, mlp_ratio: float, norm_affine: bool, norm_eps: float = 1e-6,
        rel_pos_grid: int | None = None, name: str | None = None,
    ):
        super().__init__(name=name)
        self.num_heads, self.mlp_ratio = num_heads, mlp_ratio
        self.norm_affine, self.norm_eps, self.rel_pos_grid = norm_affine, norm_eps, rel_pos_grid

    def __call__(
        self, x: Float[Array, "b n w"], cond: Float[Array, "b c"],
        index: Int[Array, "bb n n"] | None = None,
    ) -> Float[Array, "b n w"]:
        x = materialize_cotangent(x)
        w = x.shape[-1]
        mod = dense(6 * w, "adaln", zero_init=True)(cond)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
        h = LayerNorm(self.norm_affine, self.norm_eps, name="norm1")(x, shift_a, scale_a)
        x = x + gate_a[:, None, :] * Attention(self.num_heads, self.rel_pos_grid)(h, index)
        h = LayerNorm(self.norm_affine, self.norm_eps, name="norm2")(x, shift_m, scale_m)
        return x + gate_m[:, None, :] * Mlp(int(w * self.mlp_ratio))(h)


class ViTBlock(hk.Module):
    """Pre-norm ViT block: x + attn(LN(x)); x + mlp(LN(x)). ``cond`` is ignored."""

    def __init__(
        self, num_heads: int, mlp_ratio: float, norm_affine: bool, norm_eps: float = 1e-6,
        rel_pos_grid: int | None = None, name: str | None = None,
    ):
        super().__init__(name=name)
        self.num_heads, self.mlp_ratio = num_heads, mlp_ratio
        self.norm_affine, self.norm_eps, self.rel_pos_grid = norm_affine, norm_eps, rel_pos_grid

    def __call__(
        self, x: Float[Array, "b n w"], cond: Float[Array, "b c"] | None = None,
        index: Int[Array, "bb n n"] | None = None,
    ) -> Float[Array, "b n w"]:
        del cond
        x = materialize_cotangent(x)
        w = x.shape[-1]
        x = x + Attention(self.num_heads, self.rel_pos_grid)(
            LayerNorm(self.norm_affine, self.norm_eps, name="norm1")(x), index
        )
        return x + Mlp(int(w * self.mlp_ratio))(LayerNorm(self.norm_affine, self.norm_eps, name="norm2")(x))


def make_block(
    adaln: bool, num_heads: int, mlp_ratio: float, norm_affine: bool, norm_eps: float,
    rel_pos_grid: int | None, name: str,
) -> AdaLNBlock | ViTBlock:
    cls = AdaLNBlock if adaln else ViTBlock
    return cls(num_heads, mlp_ratio, norm_affine, norm_eps, rel_pos_grid, name=name)


class FinalLayer(hk.Module):
    """LN -> (shift, scale from cond; no gate) -> zero-initialised Dense(O)."""

    def __init__(self, out_dim: int, adaln: bool, norm_affine: bool, norm_eps: float = 1e-6,
                 name: str = "final_layer"):
        super().__init__(name=name)
        self.out_dim, self.adaln, self.norm_affine, self.norm_eps = out_dim, adaln, norm_affine, norm_eps

    def __call__(
        self, x: Float[Array, "b n w"], cond: Float[Array, "b c"] | None
    ) -> Float[Array, "b n o"]:
        shift = scale = None
        if self.adaln:
            shift, scale = jnp.split(dense(2 * x.shape[-1], "adaln", zero_init=True)(cond), 2, axis=-1)
        h = LayerNorm(self.norm_affine, self.norm_eps, name="norm")(x, shift, scale)
        return dense(self.out_dim, "linear", zero_init=True)(h)
