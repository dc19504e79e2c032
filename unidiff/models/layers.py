"""Small building blocks: LayerNorm, modulation, patch / position / time / label embeddings.

All modules are dtype-agnostic: they compute in the dtype of their input and parameters
(e.g. bfloat16 when the caller casts both), except LayerNorm (statistics, affine and
adaLN modulation) and sinusoid features, which are computed in float32 and cast back.

Shape glossary: B batch, N tokens in a sequence, L = gh * gw patch tokens, K visible
tokens, P = p*p*C values per patch, W width, F frequency features.
"""

from __future__ import annotations

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

# PyTorch's nn.Linear in DiT/MAE is re-initialised with xavier_uniform, biases 0.
xavier_uniform = hk.initializers.VarianceScaling(1.0, "fan_avg", "uniform")
normal_002 = hk.initializers.RandomNormal(stddev=0.02)
zeros = hk.initializers.Constant(0.0)


class Dense(hk.Linear):
    """``hk.Linear`` (same parameters ``w`` (in, out), ``b``) applied to a (rows, in)
    view of its input, whatever the number of leading axes.

    Why: on a (B, N, W) input the weight gradient is a dot contracting two axes (B and
    N), and XLA:CPU canonicalises that by materialising a transposed copy of the
    activation or of the gradient (one (W, B*N) copy per layer, every step). On the
    (B*N, W) view the same dot contracts one axis and runs without the copy. Measured
    with ``benchmarks/step_throughput.py``'s step: S/4 DiT at 64x64, batch 32, 8.38
    against 9.54 s per step together with the attention projections
    (benchmarks/README.md).
    """

    def __call__(self, x: Float[Array, "... i"], *, precision=None) -> Float[Array, "... o"]:
        lead = x.shape[:-1]
        y = super().__call__(x.reshape(-1, x.shape[-1]), precision=precision)
        return y.reshape(*lead, y.shape[-1])


def dense(features: int, name: str, zero_init: bool = False) -> Dense:
    """A Linear layer with the papers' init (xavier uniform or zeros, bias zero)."""
    return Dense(features, w_init=zeros if zero_init else xavier_uniform, b_init=zeros, name=name)


class LayerNorm(hk.Module):
    """LayerNorm over the last axis with statistics in float32; optional affine
    (parameters ``scale``, ``offset``); optionally followed by the adaLN modulation.

    ``LayerNorm(...)(x)`` normalises; ``LayerNorm(...)(x, shift, scale)`` returns
    ``modulate(LayerNorm(...)(x), shift, scale)`` as one op (``layer_norm``), whose
    hand-written gradient is cheaper than the composition's.
    """

    def __init__(self, affine: bool, eps: float = 1e-6, name: str | None = None):
        super().__init__(name=name)
        self.affine = affine
        self.eps = eps

    def __call__(
        self, x: Float[Array, "... d"], shift: Float[Array, "b d"] | None = None,
        scale: Float[Array, "b d"] | None = None,
    ) -> Float[Array, "... d"]:
        gamma = beta = None
        if self.affine:
            d = x.shape[-1]
            gamma = hk.get_parameter("scale", (d,), x.dtype, init=hk.initializers.Constant(1.0))
            beta = hk.get_parameter("offset", (d,), x.dtype, init=zeros)
        return layer_norm(x, self.eps, gamma, beta, shift, scale)


def layer_norm(
    x: Float[Array, "... d"], eps: float, gamma: Float[Array, "d"] | None = None,
    beta: Float[Array, "d"] | None = None, shift: Float[Array, "b d"] | None = None,
    scale: Float[Array, "b d"] | None = None,
) -> Float[Array, "... d"]:
    """((x - mean) / sqrt(var + eps) * gamma + beta) * (1 + scale) + shift over the last
    axis, in float32, cast to x's dtype. ``gamma``/``beta`` (affine) and ``shift``/
    ``scale`` (adaLN modulation, per example: x is (B, N, D), shift and scale (B, D),
    broadcast over tokens) are optional; modulation needs both.

    The gradient is written by hand (``jax.custom_vjp``). Autodiff of the composition
    (LayerNorm, then ``modulate``) left XLA:CPU about a dozen kernels per norm in the
    backward pass, several materialising (B, N, D) temporaries, and four reductions over
    tokens (shift, scale, and the affine gamma and beta). Here the backward is two
    reductions over tokens (of g and g * xhat; the four parameter gradients are
    combinations of those two (B, D) sums), two over the feature axis and one
    elementwise pass for dx, with xhat recomputed from the saved mean and 1/std
    (benchmarks/README.md).
    """
    if (shift is None) != (scale is None):
        raise ValueError("layer_norm: the modulation needs both shift and scale")
    if shift is not None and not (x.ndim == 3 and shift.shape == scale.shape == (x.shape[0], x.shape[2])):
        raise ValueError(
            f"layer_norm: modulation expects x (B, N, D) and shift, scale (B, D); got x {x.shape}, "
            f"shift {shift.shape}, scale {scale.shape}"
        )
    x, gamma, beta, shift, scale = cast_to_common_varying(x, gamma, beta, shift, scale)
    return _layer_norm(x, gamma, beta, shift, scale, float(eps))


def varying_axes(a: Array) -> frozenset[str]:
    """The manual mesh axes (inside ``jax.shard_map``) that ``a`` varies over; empty
    outside shard_map and for values replicated over every axis (e.g. the parameters,
    a constant table)."""
    aval = jax.typeof(a)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))  # the spelling of earlier JAX releases


def cast_to_common_varying(*arrays: Array | None) -> list[Array | None]:
    """Cast every array (``None`` passes through) to vary over each manual mesh axis that
    any of them varies over (``jax.lax.pcast(..., to="varying")``).

    Why: a ``jax.custom_vjp`` backward rule must return, for each input, a cotangent of
    that input's type. Inside shard_map, a replicated input (a frozen sin-cos table, a
    parameter the caller did not cast) meeting per-device data gets a per-device
    cotangent, which JAX rejects. Autodiff of plain jnp code inserts this cast itself,
    and its transpose is the sum over the devices; casting before the custom_vjp gives
    the hand-written gradients the same semantics. Outside shard_map nothing changes.
    """
    vary = [None if a is None else varying_axes(a) for a in arrays]
    common = frozenset().union(*(v for v in vary if v is not None))
    out = []
    for a, v in zip(arrays, vary):
        missing = () if a is None else tuple(sorted(common - v))
        out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
    return out


def _ln_stats(x32, eps):
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return mean, jax.lax.rsqrt(var + eps)


def _f32(a):
    return None if a is None else a.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _layer_norm(x, gamma, beta, shift, scale, eps):
    return _layer_norm_fwd(x, gamma, beta, shift, scale, eps)[0]


def _layer_norm_fwd(x, gamma, beta, shift, scale, eps):
    x32 = x.astype(jnp.float32)
    mean, rstd = _ln_stats(x32, eps)
    y = (x32 - mean) * rstd
    if gamma is not None:
        y = y * _f32(gamma)
    if beta is not None:
        y = y + _f32(beta)
    if scale is not None:
        y = y * (1.0 + _f32(scale))[:, None, :] + _f32(shift)[:, None, :]
    return y.astype(x.dtype), (x, mean, rstd, gamma, beta, shift, scale)


def _layer_norm_bwd(eps, res, g):
    del eps  # xhat comes back from the saved mean and 1/std
    x, mean, rstd, gamma, beta, shift, scale = res
    x32, g32 = x.astype(jnp.float32), g.astype(jnp.float32)
    xhat = (x32 - mean) * rstd
    gamma32, beta32 = _f32(gamma), _f32(beta)
    rows = tuple(range(x.ndim - 1))
    d_gamma = d_beta = d_shift = d_scale = None
    if scale is not None:
        # z = xhat * gamma + beta is what the modulation scales; y = z * a + shift.
        a = 1.0 + _f32(scale)  # (B, D)
        sum_g = jnp.sum(g32, axis=1)  # (B, D)
        sum_gx = jnp.sum(g32 * xhat, axis=1)  # (B, D)
        d_shift = sum_g
        d_scale = (sum_gx if gamma is None else gamma32 * sum_gx) + (0.0 if beta is None else beta32 * sum_g)
        if gamma is not None:
            d_gamma = jnp.sum(a * sum_gx, axis=0)
        if beta is not None:
            d_beta = jnp.sum(a * sum_g, axis=0)
        d_xhat = g32 * (a if gamma is None else a * gamma32)[:, None, :]
    else:
        if gamma is not None:
            d_gamma = jnp.sum(g32 * xhat, axis=rows)
        if beta is not None:
            d_beta = jnp.sum(g32, axis=rows)
        d_xhat = g32 if gamma is None else g32 * gamma32
    mean_d = jnp.mean(d_xhat, axis=-1, keepdims=True)
    mean_dx = jnp.mean(d_xhat * xhat, axis=-1, keepdims=True)
    dx = rstd * (d_xhat - mean_d - xhat * mean_dx)

    def cast(d, like):
        return None if like is None else d.astype(like.dtype)

    return (dx.astype(x.dtype), cast(d_gamma, gamma), cast(d_beta, beta), cast(d_shift, shift),
            cast(d_scale, scale))


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def modulate(
    x: Float[Array, "b n d"], shift: Float[Array, "b d"], scale: Float[Array, "b d"]
) -> Float[Array, "b n d"]:
    """AdaLN modulation x * (1 + scale) + shift, broadcast over tokens."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


# ----------------------------------------------------------------------------------
# Position embeddings
# ----------------------------------------------------------------------------------
def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(N,) positions -> (N, dim): [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-2k/dim)."""
    if dim % 2:
        raise ValueError(f"dim: the 1-D sin-cos embedding needs an even dim, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    args = positions.reshape(-1).astype(np.float64)[:, None] * omega[None, :]
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)


def sincos_2d(dim: int, grid: int) -> np.ndarray:
    """(grid*grid, dim) fixed 2-D sin-cos embedding in raster order (MAE/DiT layout):
    the first dim/2 channels encode the column index, the last dim/2 the row index."""
    if dim % 4:
        raise ValueError(f"dim: the 2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    return np.concatenate(
        [sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], axis=1
    ).astype(np.float32)


def position_embedding(
    kind: str, grid: int, dim: int, dtype, name: str = "pos_embed"
) -> Float[Array, "l d"] | None:
    """The (L, dim) position table of ``kind`` (see config.POS_EMBED_KINDS), or None.

    ``learned``: parameter, UMD init N(0, std = 1/sqrt(gh*gw)); ``sincos_learned``:
    parameter initialised with the 2-D sin-cos table; ``sincos_frozen``: a constant, so
    it never shows up among the parameters or the gradients.
    """
    length = grid * grid
    if kind == "none":
        return None
    if kind == "sincos_frozen":
        return jnp.asarray(sincos_2d(dim, grid), dtype)
    if kind == "learned":
        init = hk.initializers.RandomNormal(stddev=1.0 / np.sqrt(length))
    elif kind == "sincos_learned":
        init = lambda shape, dt: jnp.asarray(sincos_2d(dim, grid), dt)  # noqa: E731
    else:
        raise ValueError(f"pos_embed: unknown kind {kind!r}")
    return hk.get_parameter(name, (length, dim), dtype, init=init).astype(dtype)


def add_batch_shared(x: Float[Array, "b *rest"], shared: Float[Array, "*rest"]) -> Float[Array, "b *rest"]:
    """``x + shared[None]``: one tensor added to every example, same value and gradients.

    Used for the position tables and MDT's batch-shared relative position bias. The
    gradient of ``shared``, a sum over the batch axis, is computed as a matmul with a
    ones vector: XLA:CPU reduces a short leading axis very slowly (a (4, 256, 384)
    gradient: 2.4 ms against 0.14 ms for the matmul; at batch 32, 19 ms against 0.25 ms;
    benchmarks/README.md)."""
    if shared.shape != x.shape[1:]:
        # The hand-written gradient sums over the batch axis only, so it cannot
        # broadcast the way ``x + shared[None]`` would.
        raise ValueError(f"add_batch_shared: shared has shape {shared.shape}, expected one "
                         f"example's shape {x.shape[1:]} (x is {x.shape}; no broadcasting)")
    x, shared = cast_to_common_varying(x, shared.astype(x.dtype))
    return _add_batch_shared(x, shared)


@jax.custom_vjp
def _add_batch_shared(x, shared):
    return x + shared[None]


def _add_batch_shared_fwd(x, shared):
    return x + shared[None], None


def _add_batch_shared_bwd(_, g):
    ones = jnp.ones((g.shape[0],), g.dtype)
    g_shared = jax.lax.dot_general(ones, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return g, g_shared.astype(g.dtype)


_add_batch_shared.defvjp(_add_batch_shared_fwd, _add_batch_shared_bwd)


# ----------------------------------------------------------------------------------
# Time and label conditioning
# ----------------------------------------------------------------------------------
def timestep_features(
    t: Int[Array, "b"] | Float[Array, "b"], dim: int, order: str = "sin_cos", max_period: float = 10000.0
) -> Float[Array, "b f"]:
    """Sinusoidal features of the table index t in float32: frequencies
    max_period^(-k/half), k < half = dim // 2; ``order`` puts sin or cos first; an odd
    ``dim`` is padded with one zero."""
    half = dim // 2
    freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    parts = [jnp.sin(args), jnp.cos(args)]
    if order == "cos_sin":
        parts = parts[::-1]
    elif order != "sin_cos":
        raise ValueError(f"freq_order: expected 'sin_cos' or 'cos_sin', got {order!r}")
    if dim % 2:
        parts.append(jnp.zeros_like(args[:, :1]))
    return jnp.concatenate(parts, axis=-1)


class TimeEmbed(hk.Module):
    """t -> sinusoid(F) -> Dense(W) -> SiLU -> Dense(W) (weights N(0, 0.02), as DiT)."""

    def __init__(self, width: int, freq_dim: int, order: str, max_period: float, name: str = "time_embed"):
        super().__init__(name=name)
        self.width, self.freq_dim, self.order, self.max_period = width, freq_dim, order, max_period

    def __call__(self, t: Int[Array, "b"], dtype) -> Float[Array, "b w"]:
        h = timestep_features(t, self.freq_dim, self.order, self.max_period).astype(dtype)
        h = hk.Linear(self.width, w_init=normal_002, b_init=zeros, name="fc1")(h)
        return hk.Linear(self.width, w_init=normal_002, b_init=zeros, name="fc2")(jax.nn.silu(h))


class LabelEmbed(hk.Module):
    """Label table with num_classes + 1 rows; the last row is the null class used for
    classifier-free guidance, label dropout and the clean branch."""

    def __init__(self, num_classes: int, width: int, name: str = "label_embed"):
        super().__init__(name=name)
        self.num_classes, self.width = num_classes, width

    def __call__(self, labels: Int[Array, "b"] | None, batch: int, dtype) -> Float[Array, "b w"]:
        table = hk.get_parameter("embeddings", (self.num_classes + 1, self.width), dtype, init=normal_002)
        if labels is None:
            labels = jnp.full((batch,), self.num_classes, jnp.int32)
        return jnp.take(table, labels, axis=0).astype(dtype)


def drop_labels(
    key: PRNGKeyArray, labels: Int[Array, "b"], rate: float, num_classes: int
) -> Int[Array, "b"]:
    """Label dropout for classifier-free guidance: each label becomes the null class
    ``num_classes`` with probability ``rate``."""
    drop = jax.random.bernoulli(key, rate, labels.shape)
    return jnp.where(drop, num_classes, labels).astype(labels.dtype)


def conditioning(
    t: Int[Array, "b"], labels: Int[Array, "b"] | None, *, width: int, num_classes: int,
    freq_dim: int, freq_order: str, max_period: float, dtype,
) -> Float[Array, "b w"]:
    """cond = silu(t_emb + y_emb); no label term when num_classes == 0 (labels ignored)."""
    emb = TimeEmbed(width, freq_dim, freq_order, max_period)(t, dtype)
    if num_classes > 0:
        emb = emb + LabelEmbed(num_classes, width)(labels, t.shape[0], dtype)
    return jax.nn.silu(emb)
