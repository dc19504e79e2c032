"""USP's transfer of a pretrained encoder into DiT (REFERENCE §4, USP §3).

USP pretrains an MAE (in VAE latent space) and initialises DiT with its encoder: the
patch embedding and every block's attention, MLP and LayerNorm parameters are copied, a
learned position table is interpolated to DiT's grid, and everything that only the
pretraining had (the decoder, the mask token, the CLS tokens, the encoder's final norm,
its conditioning) is dropped. DiT's own AdaLN modulations, time and label embeddings and
final layer keep their fresh initialisation. Because the AdaLN gates start at zero, every
transferred block is the identity at step 0 and the pretrained blocks come in as
training opens their gates.

DiT's blocks normalise without a scale and offset; to take the pretrained ones the target
needs affine LayerNorms (``dit_config(..., norm_affine=True)``, the ``dit_affine``
architecture of the training binaries).

    pre_cfg = um.mae_config("B/2", 32, 4)                   # USP's pretraining
    dit_cfg = um.dit_config("B/2", 32, 4, norm_affine=True)
    params, copied = um.encoder_into_dit(pretrained, pre_cfg, dit_cfg,
                                         um.Model(dit_cfg).init(key))

Shape glossary: W width, L = g*g position-table rows for a g x g grid of patches.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from unidiff.models.config import ModelConfig

# What a block holds in both kinds of block (ViTBlock and AdaLNBlock); AdaLN's ``adaln``
# modulation is DiT's own and stays fresh.
BLOCK_MODULES = ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2")
BLOCK_NORMS = ("norm1", "norm2")


def interpolate_pos_embed(table: Float[Array, "l w"], grid: int) -> Float[Array, "m w"]:
    """A (g*g, W) position table resized to a (grid*grid, W) one, bicubically over the
    2-D grid of patches (row-major, as the models lay out their tokens); unchanged when
    the grids are the same size."""
    length, width = table.shape
    g = int(round(np.sqrt(length)))
    if g * g != length:
        raise ValueError(f"pos_embed: {length} rows are not a square grid of patches")
    if g == grid:
        return table
    square = jnp.asarray(table, jnp.float32).reshape(g, g, width)
    resized = jax.image.resize(square, (grid, grid, width), method="bicubic")
    return resized.reshape(grid * grid, width).astype(table.dtype)


def check_transfer(source: ModelConfig, target: ModelConfig) -> None:
    """``ValueError`` naming the field unless the encoder of a ``source`` model can
    initialise the DiT ``target`` (see ``encoder_into_dit``): from the configs alone, so
    a binary can refuse before it reads a checkpoint."""

    def fail(field: str, msg: str) -> None:
        raise ValueError(f"{field}: {msg}")

    if not target.adaln:
        fail("adaln", "the target must be a DiT (AdaLN blocks); got a model without AdaLN")
    for field in ("width", "num_heads", "mlp_ratio", "patch_size", "in_channels"):
        a, b = getattr(source, field), getattr(target, field)
        if a != b:
            fail(field, f"the pretrained encoder has {a!r}, the DiT {b!r}: blocks would not fit")
    if source.depth != target.depth + target.decoder_depth:
        fail("depth", f"the pretrained encoder has {source.depth} blocks and the DiT "
                      f"{target.depth + target.decoder_depth}: USP copies block i into block i, "
                      "so use a variant with as many blocks")
    if target.side_interpolater or target.rel_pos_bias:
        fail("side_interpolater", "the target must be a plain DiT (no side-interpolater or "
                                  "relative position bias)")
    if source.norm_affine and not target.norm_affine:
        fail("norm_affine", "the pretrained LayerNorms have a scale and offset that DiT's "
                            "affine-free norms cannot take: build the DiT with norm_affine=True")


def encoder_into_dit(
    pretrained: Any, source: ModelConfig, target: ModelConfig, fresh: Any
) -> tuple[Any, list[str]]:
    """``fresh`` (a ``Model(target).init`` tree) with the pretrained encoder of
    ``pretrained`` (a ``Model(source)`` tree) copied in as USP does; returns the new tree
    and the parameter paths that came from ``pretrained``.

    ``target`` is a DiT: AdaLN blocks, every block in the encoder or split between
    encoder and decoder (block i of the pretrained encoder goes to the DiT's i-th block),
    affine LayerNorms wherever the pretrained ones are affine. A learned position table
    on both sides is interpolated to the DiT's grid; a frozen sin-cos one on either side
    needs nothing. ``ValueError`` naming the field when the two do not fit, or naming the
    parameter when ``pretrained`` lacks one or holds it in another shape.
    """
    check_transfer(source, target)
    src = pretrained["encoder"]
    out = jax.tree.map(lambda a: a, fresh)  # a new tree; fresh is left as it was
    copied: list[str] = []

    def take(module: str, name: str) -> Array:
        if module not in src or name not in src[module]:
            raise ValueError(f"pretrained params: no ['encoder'][{module!r}][{name!r}] "
                             f"(is it a checkpoint of a model with a {source.depth}-block encoder?)")
        return src[module][name]

    def put(part: str, module: str, name: str, value: Array, src_path: str) -> None:
        have = out[part][module][name]
        if tuple(np.shape(value)) != tuple(have.shape):
            raise ValueError(f"pretrained params: {src_path} has shape {tuple(np.shape(value))}, "
                             f"the DiT's ['{part}'][{module!r}][{name!r}] {tuple(have.shape)}")
        out[part][module][name] = jnp.asarray(value, have.dtype)
        copied.append(f"['{part}'][{module!r}][{name!r}]")

    put("encoder", "patch_embed", "w", take("patch_embed", "w"), "patch_embed/w")
    put("encoder", "patch_embed", "b", take("patch_embed", "b"), "patch_embed/b")
    for i in range(source.depth):
        part, j = ("encoder", i) if i < target.depth else ("decoder", i - target.depth)
        for sub in BLOCK_MODULES:
            for name in ("w", "b"):
                put(part, f"block_{j}/{sub}", name, take(f"block_{i}/{sub}", name),
                    f"block_{i}/{sub}/{name}")
        if source.norm_affine:  # else the DiT's fresh scale 1, offset 0 are the same map
            for sub in BLOCK_NORMS:
                for name in ("scale", "offset"):
                    put(part, f"block_{j}/{sub}", name, take(f"block_{i}/{sub}", name),
                        f"block_{i}/{sub}/{name}")

    learned = ("learned", "sincos_learned")
    if source.pos_embed in learned and target.pos_embed in learned:
        table = take("~", "pos_embed")
        put("encoder", "~", "pos_embed", interpolate_pos_embed(table, target.grid_size), "~/pos_embed")
    return out, copied
