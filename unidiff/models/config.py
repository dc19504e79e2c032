"""Model configuration: one frozen, validated dataclass, a table of sizes, and presets.

A variant string is ``"<size>/<patch>"`` (e.g. ``"B/4"``). Sizes are
(width, encoder depth, decoder depth, heads), MLP ratio 4 (REFERENCE sec. 2):

    P  64/1/1/2      (pico: one block on each side, for tests and smoke runs)
    N  128/4/2/4     (nano, for CPU quickstarts)
    Ti 192/12/4/3
    S  384/12/4/6
    B  768/12/4/12
    L  1024/24/8/16
    XL 1152/28/8/16  (the papers give no UMD decoder depth for XL; 8 like L)

Presets:
  * ``umd_config``     UMD encoder-decoder (learned pos-embeds, 4 CLS, affine LN, AdaLN-Zero)
  * ``dit_config``     exactly DiT: every block on all tokens, no CLS, frozen sin-cos,
                       affine-free LN, 256-d cos/sin frequencies, learned sigma optional
  * ``mae_config``     MAE: plain pre-norm ViT, conditioning as a token, 512x8 decoder
  * ``maskdit_config`` MaskDiT: DiT encoder on visible tokens + 512x8 DiT decoder
  * ``mdt_config``     MDT v1: DiT blocks with relative position bias, side-interpolater
                       before the last two blocks

Shape glossary: L = (image_size / patch_size)^2 tokens, P = patch_size^2 * in_channels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

SIZES: dict[str, tuple[int, int, int, int]] = {
    "P": (64, 1, 1, 2),
    "N": (128, 4, 2, 4),
    "Ti": (192, 12, 4, 3),
    "S": (384, 12, 4, 6),
    "B": (768, 12, 4, 12),
    "L": (1024, 24, 8, 16),
    "XL": (1152, 28, 8, 16),
}

POS_EMBED_KINDS = ("learned", "sincos_learned", "sincos_frozen", "none")
OUTPUT_KINDS = ("x0_eps", "eps_sigma", "eps")
FREQ_ORDERS = ("sin_cos", "cos_sin")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that decides the architecture. Invalid values raise ``ValueError``
    naming the field at construction.

    Layout: the encoder runs ``depth`` blocks on the visible tokens (+ CLS tokens); the
    optional side-interpolater (MDT) runs one block on all tokens; the decoder runs
    ``decoder_depth`` blocks on all tokens and the final layer.
    """

    image_size: int
    patch_size: int
    in_channels: int
    width: int
    depth: int
    num_heads: int
    decoder_depth: int
    num_classes: int = 0  # 0 = unconditional (no label table); else class num_classes = null
    decoder_width: int | None = None  # None = width (no projection between the pieces)
    decoder_heads: int | None = None  # None = num_heads
    mlp_ratio: float = 4.0
    num_cls_tokens: int = 4
    adaln: bool = True  # False = MAE mode: plain pre-norm blocks, cond as an extra token
    norm_affine: bool = True  # LayerNorm scale/offset (UMD yes, DiT no)
    norm_eps: float = 1e-6
    pos_embed: str = "learned"  # encoder position embedding, one of POS_EMBED_KINDS
    decoder_pos_embed: str = "learned"
    freq_dim: int | None = None  # sinusoidal time features; None = width
    freq_order: str = "sin_cos"  # UMD: sin then cos; DiT: cos then sin
    max_period: float = 10000.0
    output: str = "x0_eps"  # x0_eps: x0 + eps heads; eps_sigma: DiT learn_sigma; eps
    encoder_norm: bool = True  # final LayerNorm on the encoder output
    mask_token: bool = True  # decoder can fill hidden slots (needed for masked input)
    side_interpolater: bool = False
    si_pos_embed: str = "learned"
    rel_pos_bias: bool = False  # MDT relative position bias in every block

    def __post_init__(self) -> None:
        def fail(field: str, msg: str) -> None:
            raise ValueError(f"ModelConfig.{field}: {msg} (got {getattr(self, field)!r})")

        for f in ("image_size", "patch_size", "in_channels", "width", "num_heads"):
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                fail(f, "must be an integer >= 1")
        for f in ("depth", "decoder_depth", "num_classes", "num_cls_tokens"):
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                fail(f, "must be an integer >= 0")
        if self.image_size % self.patch_size:
            fail("patch_size", f"must divide image_size={self.image_size}")
        if self.width % self.num_heads:
            fail("num_heads", f"must divide width={self.width}")
        for f in ("decoder_width", "decoder_heads", "freq_dim"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
                fail(f, "must be None or an integer >= 1")
        if self.dec_width % self.dec_heads:
            fail("decoder_heads", f"must divide decoder_width={self.dec_width}")
        if not self.mlp_ratio > 0 or int(self.width * self.mlp_ratio) < 1:
            fail("mlp_ratio", "must be > 0")
        if not self.norm_eps > 0:
            fail("norm_eps", "must be > 0")
        if not self.max_period > 0:
            fail("max_period", "must be > 0")
        for f in ("pos_embed", "decoder_pos_embed", "si_pos_embed"):
            if getattr(self, f) not in POS_EMBED_KINDS:
                fail(f, f"expected one of {POS_EMBED_KINDS}")
        if self.output not in OUTPUT_KINDS:
            fail("output", f"expected one of {OUTPUT_KINDS}")
        if self.freq_order not in FREQ_ORDERS:
            fail("freq_order", f"expected one of {FREQ_ORDERS}")
        if self.side_interpolater:
            if self.si_pos_embed == "none":
                fail("si_pos_embed", "the side-interpolater needs a position embedding")
            if self.decoder_pos_embed != "none":
                fail(
                    "decoder_pos_embed",
                    "must be 'none' with side_interpolater=True (the side-interpolater "
                    "adds its own position embedding in front of the decoder)",
                )
            if self.dec_width != self.width:
                fail("decoder_width", "must equal width with side_interpolater=True")

    # Derived sizes -------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """L, the number of patch tokens."""
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        """P = p * p * C values per patch token."""
        return self.patch_size**2 * self.in_channels

    @property
    def out_channels(self) -> int:
        return self.in_channels * (1 if self.output == "eps" else 2)

    @property
    def dec_width(self) -> int:
        return self.width if self.decoder_width is None else self.decoder_width

    @property
    def dec_heads(self) -> int:
        return self.num_heads if self.decoder_heads is None else self.decoder_heads

    @property
    def frequency_dim(self) -> int:
        return self.width if self.freq_dim is None else self.freq_dim

    @property
    def decoder_has_mask_token(self) -> bool:
        # With a side-interpolater the hidden slots are filled (by its own mask token)
        # before the decoder, so the decoder never needs one.
        return self.mask_token and not self.side_interpolater

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def parse_variant(variant: str) -> tuple[int, int, int, int, int]:
    """``"B/4"`` -> (width, depth, decoder_depth, heads, patch)."""
    if not isinstance(variant, str) or variant.count("/") != 1:
        raise ValueError(f"variant: expected '<size>/<patch>' like 'B/4', got {variant!r}")
    size, patch = variant.split("/")
    if size not in SIZES:
        raise ValueError(f"variant: unknown size {size!r} in {variant!r}; expected one of {list(SIZES)}")
    if not patch.isdigit() or int(patch) < 1:
        raise ValueError(f"variant: patch size {patch!r} in {variant!r} must be a positive integer")
    return (*SIZES[size], int(patch))


def _build(variant: str, image_size: int, in_channels: int, defaults: dict, overrides: dict) -> ModelConfig:
    width, depth, decoder_depth, heads, patch = parse_variant(variant)
    fields = dict(
        image_size=image_size, patch_size=patch, in_channels=in_channels, width=width,
        depth=depth, decoder_depth=decoder_depth, num_heads=heads,
    )
    fields.update(defaults)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"overrides: unknown ModelConfig field(s) {unknown}")
    fields.update(overrides)
    return ModelConfig(**fields)


def umd_config(variant: str, image_size: int, in_channels: int, num_classes: int = 0, **overrides) -> ModelConfig:
    """UMD: AdaLN-Zero encoder-decoder, learned position embeddings (UMD init), 4 CLS
    tokens, affine LayerNorm, width-d sin/cos time features, x0 + eps heads.

    Passing ``side_interpolater=True`` also switches the decoder position embedding off
    (the side-interpolater provides it) unless ``decoder_pos_embed`` is given too.
    """
    if overrides.get("side_interpolater") and "decoder_pos_embed" not in overrides:
        overrides = {**overrides, "decoder_pos_embed": "none"}
    return _build(variant, image_size, in_channels, dict(num_classes=num_classes), overrides)


def dit_config(
    variant: str, input_size: int, in_channels: int, num_classes: int = 1000,
    learn_sigma: bool = True, **overrides,
) -> ModelConfig:
    """Exactly the DiT architecture: all ``depth`` blocks in the encoder on all tokens,
    a decoder holding only the final layer, frozen sin-cos position embedding, no CLS,
    affine-free LayerNorm, 256-d cos-then-sin frequency embedding, output eps (+ sigma).
    No mask token: masked input that hides tokens raises unless ``mask_token=True``."""
    width, depth, _, heads, _ = parse_variant(variant)
    defaults = dict(
        num_classes=num_classes, depth=depth, decoder_depth=0, num_cls_tokens=0,
        norm_affine=False, pos_embed="sincos_frozen", decoder_pos_embed="none",
        freq_dim=256, freq_order="cos_sin", output="eps_sigma" if learn_sigma else "eps",
        encoder_norm=False, mask_token=False,
    )
    return _build(variant, input_size, in_channels, defaults, overrides)


def mae_config(variant: str, image_size: int, in_channels: int, num_classes: int = 0, **overrides) -> ModelConfig:
    """MAE: plain pre-norm ViT encoder with one CLS token and the conditioning as an
    extra token, frozen sin-cos position embeddings, 512-wide 8-block decoder (16
    heads) behind a linear projection, x0 (+ unused eps) head."""
    defaults = dict(
        num_classes=num_classes, adaln=False, num_cls_tokens=1, pos_embed="sincos_frozen",
        decoder_pos_embed="sincos_frozen", decoder_width=512, decoder_depth=8, decoder_heads=16,
    )
    return _build(variant, image_size, in_channels, defaults, overrides)


def maskdit_config(
    variant: str, input_size: int, in_channels: int, num_classes: int = 1000, **overrides
) -> ModelConfig:
    """MaskDiT: the DiT encoder (all blocks, on visible tokens only) followed by a
    512-wide 8-block AdaLN decoder with a mask token and frozen sin-cos embeddings;
    x0 + eps heads (denoising loss on visible, reconstruction on hidden tokens)."""
    width, depth, _, heads, _ = parse_variant(variant)
    defaults = dict(
        num_classes=num_classes, depth=depth, num_cls_tokens=0, norm_affine=False,
        pos_embed="sincos_frozen", decoder_pos_embed="sincos_frozen", decoder_width=512,
        decoder_depth=8, decoder_heads=16, freq_dim=256, freq_order="cos_sin",
        output="x0_eps", encoder_norm=False, mask_token=True,
    )
    return _build(variant, input_size, in_channels, defaults, overrides)


def mdt_config(
    variant: str, input_size: int, in_channels: int, num_classes: int = 1000,
    learn_sigma: bool = True, si_position: int = -2, **overrides,
) -> ModelConfig:
    """MDT (v1): DiT blocks with relative position bias and learnable (sin-cos
    initialised) position embeddings. The side-interpolater sits before block
    ``si_position`` of the variant's ``depth`` blocks (negative counts from the end;
    default -2 = before the last two blocks): the encoder holds the blocks before it,
    the decoder the blocks after it."""
    width, depth, _, heads, _ = parse_variant(variant)
    if not isinstance(si_position, (int, np.integer)) or not -depth <= si_position <= depth:
        raise ValueError(
            f"si_position: must be an integer block index in [{-depth}, {depth}] for "
            f"{variant!r} ({depth} blocks), got {si_position!r}"
        )
    n_enc = si_position % depth if si_position < 0 else si_position
    defaults = dict(
        num_classes=num_classes, depth=n_enc, decoder_depth=depth - n_enc, num_cls_tokens=0,
        norm_affine=False, pos_embed="sincos_learned", decoder_pos_embed="none",
        si_pos_embed="sincos_learned", side_interpolater=True, rel_pos_bias=True,
        freq_dim=256, freq_order="cos_sin", output="eps_sigma" if learn_sigma else "eps",
        encoder_norm=False, mask_token=True,
    )
    return _build(variant, input_size, in_channels, defaults, overrides)


def count_params(config: ModelConfig, trainable_only: bool = True) -> int:
    """Number of parameters, from shapes only (``jax.eval_shape``: no memory for XL).

    Frozen sin-cos position embeddings are constants, not parameters; with
    ``trainable_only=False`` they are counted too (as PyTorch counts frozen buffers
    registered as parameters)."""
    from unidiff.models.model import Model  # late import: model.py imports this module

    shapes = jax.eval_shape(Model(config).init, jax.random.key(0))
    n = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
    if not trainable_only:
        frozen = [config.pos_embed, config.decoder_pos_embed]
        widths = [config.width, config.dec_width]
        n += sum(config.num_tokens * w for k, w in zip(frozen, widths) if k == "sincos_frozen")
        if config.side_interpolater and config.si_pos_embed == "sincos_frozen":
            n += config.num_tokens * config.width
    return n
