"""``Model``: the one entry point that builds encoder, side-interpolater and decoder from
a ``ModelConfig`` and composes them with a pure function.

The three pieces are separate stateless ``hk.transform``s with their own parameter
subtrees, ``params = {'encoder': ..., 'side_interpolater': ... (only when enabled),
'decoder': ...}``, so the encoder can run alone (representations), a decoder can be
swapped, and the side-interpolater is switched by configuration.

    encoder            x_t (B,L,P), t, labels, ids_keep -> tokens (B,K,W), rep, cond
    side_interpolater  tokens (B,K,W), cond, masking    -> (B,L,W)       [MDT only]
    decoder            tokens, rep, cond, ids_restore   -> Prediction (B,L,P) each

How the papers map onto it:
  * UMD / MAE / MaskDiT: encoder on visible tokens, decoder fills mask tokens.
  * DiT: the encoder holds every block and runs on all tokens; the decoder holds only
    the final layer (no blocks, no position embedding, no mask token).
  * MDT: encoder = blocks before the side-interpolater (visible tokens only), then the
    side-interpolater (with a mask) or its position embedding (without), decoder = the
    remaining blocks on all tokens.

All methods are pure functions of their arguments: wrap them in ``jax.jit`` (or use
them inside a jitted train step). Shapes are static; K comes from ``masking``.

Shape glossary: B batch, H/W_img image size, C channels, p patch, L = (H/p)(W/p)
tokens, K kept tokens, P = p*p*C values per patch token, W width.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from unidiff.corruption.masking import Masking, no_masking
from unidiff.corruption.patches import patchify
from unidiff.models.config import ModelConfig
from unidiff.models.decoder import make_decoder
from unidiff.models.encoder import make_encoder
from unidiff.models.outputs import EncoderOutput, Prediction
from unidiff.models.side_interpolater import make_side_interpolater

Params = dict[str, Any]


class Model:
    """Builds the transforms once; ``init`` / ``apply`` / ``encode`` / ``represent``."""

    def __init__(self, config: ModelConfig):
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config: expected a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = make_encoder(config)
        self.side_interpolater = make_side_interpolater(config) if config.side_interpolater else None
        self.decoder = make_decoder(config)
        # Jitted once here: run eagerly, Haiku's initialisers would compile one small
        # program per random draw, which is far slower than one compile.
        self._init = jax.jit(self._init_params)

    # ------------------------------------------------------------------------------
    def init(self, key: PRNGKeyArray) -> Params:
        """Fresh float32 parameters for every piece (traces each piece once on a
        batch of one, with a keep-everything masking so every parameter is created)."""
        return self._init(key)

    def _init_params(self, key: PRNGKeyArray) -> Params:
        cfg = self.config
        k_enc, k_si, k_dec = jax.random.split(key, 3)
        length, w = cfg.num_tokens, cfg.width
        x = jnp.zeros((1, length, cfg.patch_dim), jnp.float32)
        t = jnp.zeros((1,), jnp.int32)
        full = no_masking(1, length)
        params = {"encoder": self.encoder.init(k_enc, x, t, None, None)}
        tokens = jnp.zeros((1, length, w), jnp.float32)
        vec = jnp.zeros((1, w), jnp.float32)
        if self.side_interpolater is not None:
            params["side_interpolater"] = self.side_interpolater.init(k_si, tokens, vec, full)
        params["decoder"] = self.decoder.init(k_dec, tokens, vec, vec, full.ids_restore)
        return params

    # ------------------------------------------------------------------------------
    def _check_inputs(self, x_t, t, labels, masking) -> None:
        cfg = self.config
        expected = (cfg.num_tokens, cfg.patch_dim)
        if x_t.ndim != 3 or tuple(x_t.shape[1:]) != expected:
            raise ValueError(
                f"x_t: expected patch tokens of shape (B, {expected[0]}, {expected[1]}) for "
                f"image_size={cfg.image_size}, patch_size={cfg.patch_size}, "
                f"in_channels={cfg.in_channels}; got {tuple(x_t.shape)}"
            )
        b = x_t.shape[0]
        if jnp.shape(t) != (b,):
            raise ValueError(f"t: expected shape ({b},) of integer table indices, got {jnp.shape(t)}")
        if labels is not None and jnp.shape(labels) != (b,):
            raise ValueError(f"labels: expected shape ({b},) or None, got {jnp.shape(labels)}")
        if masking is not None:
            if not isinstance(masking, Masking):
                raise ValueError(f"masking: expected a Masking or None, got {type(masking).__name__}")
            if masking.ids_restore.shape != (b, cfg.num_tokens) or masking.ids_keep.shape[0] != b:
                raise ValueError(
                    f"masking: ids_restore must be ({b}, {cfg.num_tokens}) and ids_keep (B, K); "
                    f"got {masking.ids_restore.shape} and {masking.ids_keep.shape}"
                )

    def encode(
        self,
        params: Params,
        x_t: Float[Array, "b l p"],
        t: Int[Array, "b"],
        labels: Int[Array, "b"] | None = None,
        masking: Masking | None = None,
    ) -> EncoderOutput:
        """Run the encoder alone on the visible tokens (all tokens when masking is None)."""
        self._check_inputs(x_t, t, labels, masking)
        ids_keep = None if masking is None else masking.ids_keep
        return self.encoder.apply(params["encoder"], x_t, t, labels, ids_keep)

    def apply(
        self,
        params: Params,
        x_t: Float[Array, "b l p"],
        t: Int[Array, "b"],
        labels: Int[Array, "b"] | None = None,
        masking: Masking | None = None,
    ) -> Prediction:
        """Full forward: Prediction(x0 | None, eps, sigma | None), each (B, L, P), in the
        dtype of ``x_t``. ``t``: table index 0..T (0 = clean); ``labels``: 0..num_classes
        (num_classes = null; None = all null)."""
        enc = self.encode(params, x_t, t, labels, masking)
        if self.side_interpolater is not None:
            full = self.side_interpolater.apply(params["side_interpolater"], enc.tokens, enc.cond, masking)
            pred = self.decoder.apply(params["decoder"], full, enc.rep, enc.cond, None)
        else:
            ids_restore = None if masking is None else masking.ids_restore
            pred = self.decoder.apply(params["decoder"], enc.tokens, enc.rep, enc.cond, ids_restore)
        cast = lambda a: None if a is None else a.astype(x_t.dtype)  # noqa: E731
        return Prediction(x0=cast(pred.x0), eps=cast(pred.eps), sigma=cast(pred.sigma))

    def represent(
        self,
        params: Params,
        images: Float[Array, "b h w c"],
        t: int | Int[Array, "b"] | None = None,
    ) -> Float[Array, "b w"]:
        """(B, H, W, C) images in [-1, 1] -> (B, width) representation (mean CLS output
        after the final norm), with no mask and the null label. ``images`` are fed as
        the model input as they are; ``t`` is the time index the model is told
        (default 0 = clean). To probe at a noisy step, noise the images first
        (``q_sample``) and pass the same t."""
        cfg = self.config
        shape = (cfg.image_size, cfg.image_size, cfg.in_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != shape:
            raise ValueError(f"images: expected (B, {shape[0]}, {shape[1]}, {shape[2]}), got {tuple(images.shape)}")
        b = images.shape[0]
        t_arr = jnp.zeros((b,), jnp.int32) if t is None else jnp.broadcast_to(jnp.asarray(t, jnp.int32), (b,))
        return self.encode(params, patchify(images, cfg.patch_size), t_arr).rep
