"""ModelConfig validation, the variant table, presets and exact parameter counts."""

from __future__ import annotations

import dataclasses

import pytest

import unidiff.models as um

# Official DiT trainable parameter counts at 32x32x4, patch 2, 1000 classes, learn_sigma.
DIT_COUNTS = {"S/2": 32_865_056, "B/2": 130_315_808, "L/2": 457_840_672, "XL/2": 674_834_720}


def dit_formula(w, depth, p, c, classes, learn_sigma, freq=256):
    """Independent count of DiT's parameters (PyTorch layer by layer)."""
    out = p * p * c * (2 if learn_sigma else 1)
    n = p * p * c * w + w  # patch-embed conv with bias
    n += freq * w + w + w * w + w  # time MLP
    n += (classes + 1) * w if classes else 0  # label table with the null row
    per_block = (w * 3 * w + 3 * w) + (w * w + w) + (w * 4 * w + 4 * w) + (4 * w * w + w) + (w * 6 * w + 6 * w)
    n += depth * per_block
    n += (w * 2 * w + 2 * w) + (w * out + out)  # final adaLN + linear
    return n


@pytest.mark.parametrize("variant", sorted(DIT_COUNTS))
def test_dit_param_counts_are_exact(variant):
    cfg = um.dit_config(variant, 32, 4, num_classes=1000, learn_sigma=True)
    w, depth, _, _, p = um.parse_variant(variant)
    assert um.count_params(cfg) == DIT_COUNTS[variant]
    assert dit_formula(w, depth, p, 4, 1000, True) == DIT_COUNTS[variant]


def test_dit_counts_match_formula_off_the_table():
    cfg = um.dit_config("S/4", 16, 3, num_classes=0, learn_sigma=False, width=64, depth=3, num_heads=4)
    assert um.count_params(cfg) == dit_formula(64, 3, 4, 3, 0, False)
    # The frozen sin-cos table is a constant; counting it needs trainable_only=False.
    assert um.count_params(cfg, trainable_only=False) == dit_formula(64, 3, 4, 3, 0, False) + 16 * 64


def test_umd_param_count_formula():
    w, depth, dd, _, p = 64, 2, 1, 4, 2
    cfg = um.umd_config("S/2", 8, 3, num_classes=7, width=w, depth=depth, decoder_depth=dd, num_heads=4)
    L, c = 16, 3
    block = 18 * w * w + 15 * w + 4 * w  # DiT block + affine LN (2 norms x 2w)
    enc = p * p * c * w + w + L * w + 4 * w  # patch embed, learned pos, 4 CLS
    enc += w * w + w + w * w + w + 8 * w  # time MLP (width-d freqs) + label table
    enc += depth * block + 2 * w  # blocks + final affine LN
    dec = w + L * w + dd * block  # mask token, pos embed, blocks
    dec += 2 * w + (w * 2 * w + 2 * w) + (w * p * p * 2 * c + p * p * 2 * c)
    assert um.count_params(cfg) == enc + dec


@pytest.mark.parametrize("size", sorted(um.SIZES))
@pytest.mark.parametrize("patch", [2, 4])
def test_variant_table(size, patch):
    cfg = um.umd_config(f"{size}/{patch}", 32, 3)
    w, depth, dd, heads = um.SIZES[size]
    assert (cfg.width, cfg.depth, cfg.decoder_depth, cfg.num_heads, cfg.patch_size) == (w, depth, dd, heads, patch)
    assert cfg.num_tokens == (32 // patch) ** 2 and cfg.patch_dim == patch * patch * 3


def test_paper_sizes():
    assert um.SIZES["S"] == (384, 12, 4, 6)
    assert um.SIZES["B"] == (768, 12, 4, 12)
    assert um.SIZES["L"] == (1024, 24, 8, 16)
    assert um.SIZES["XL"][0::3] == (1152, 16) and um.SIZES["XL"][1] == 28


def test_preset_defaults():
    umd = um.umd_config("B/4", 64, 3)
    assert (umd.num_cls_tokens, umd.adaln, umd.norm_affine, umd.pos_embed, umd.output) == (
        4, True, True, "learned", "x0_eps")
    dit = um.dit_config("XL/2", 32, 4)
    assert (dit.num_cls_tokens, dit.norm_affine, dit.pos_embed, dit.freq_dim, dit.freq_order) == (
        0, False, "sincos_frozen", 256, "cos_sin")
    assert dit.decoder_depth == 0 and dit.depth == 28 and dit.output == "eps_sigma"
    assert um.dit_config("S/2", 32, 4, learn_sigma=False).output == "eps"
    mae = um.mae_config("B/16", 224, 3)
    assert not mae.adaln and (mae.dec_width, mae.decoder_depth) == (512, 8)
    mdt = um.mdt_config("S/2", 32, 4)
    assert mdt.side_interpolater and mdt.rel_pos_bias and (mdt.depth, mdt.decoder_depth) == (10, 2)
    assert (um.mdt_config("S/2", 32, 4, si_position=4).depth, um.mdt_config("S/2", 32, 4, si_position=12).decoder_depth) == (4, 0)
    maskdit = um.maskdit_config("XL/2", 32, 4)
    assert maskdit.depth == 28 and maskdit.mask_token and maskdit.dec_width == 512


def test_umd_side_interpolater_switch():
    cfg = um.umd_config("S/2", 16, 3, side_interpolater=True)
    assert cfg.side_interpolater and cfg.decoder_pos_embed == "none"
    assert not cfg.decoder_has_mask_token


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: um.umd_config("Q/4", 32, 3), "variant"),
        (lambda: um.umd_config("B4", 32, 3), "variant"),
        (lambda: um.umd_config("B/x", 32, 3), "variant"),
        (lambda: um.dit_config("Huge/2", 32, 4), "variant"),
        (lambda: um.umd_config("B/5", 32, 3), "patch_size"),
        (lambda: um.umd_config("B/4", 32, 3, num_heads=5), "num_heads"),
        (lambda: um.umd_config("B/4", 32, 3, width=100), "num_heads"),
        (lambda: um.mae_config("B/4", 32, 3, decoder_heads=7), "decoder_heads"),
        (lambda: um.mdt_config("S/2", 32, 4, si_position=13), "si_position"),
        (lambda: um.mdt_config("S/2", 32, 4, si_position=-13), "si_position"),
        (lambda: um.mdt_config("S/2", 32, 4, si_position=1.5), "si_position"),
        (lambda: um.umd_config("B/4", 32, 3, depth=-1), "depth"),
        (lambda: um.umd_config("B/4", 32, 3, num_cls_tokens=-1), "num_cls_tokens"),
        (lambda: um.umd_config("B/4", 32, 3, pos_embed="rope"), "pos_embed"),
        (lambda: um.umd_config("B/4", 32, 3, output="v"), "output"),
        (lambda: um.umd_config("B/4", 32, 3, freq_order="tan"), "freq_order"),
        (lambda: um.umd_config("B/4", 32, 3, in_channels_typo=3), "overrides"),
        (lambda: um.umd_config("B/4", 32, 3, side_interpolater=True, decoder_pos_embed="learned"),
         "decoder_pos_embed"),
        (lambda: um.umd_config("B/4", 32, 3, side_interpolater=True, si_pos_embed="none"), "si_pos_embed"),
        (lambda: um.umd_config("B/4", 32, 0), "in_channels"),
    ],
)
def test_invalid_configs_name_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_config_is_frozen():
    cfg = um.umd_config("N/2", 8, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.width = 3  # type: ignore[misc]
    assert cfg.replace(width=64).width == 64
