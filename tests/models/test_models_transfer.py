"""USP's encoder -> DiT transfer (``unidiff.models.encoder_into_dit``, REFERENCE §4).

What is copied is checked leaf by leaf against the pretrained tree, what is not against
the fresh one; that a copied block is the pretrained block is checked by running both
blocks on the same tokens once the DiT block's AdaLN gates are opened (at its zero
initialisation a DiT block is the identity, which would prove nothing).
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import unidiff.models as um
from models_testlib import IMAGE, random_params

TINY = dict(width=32, num_heads=2, depth=2)
SOURCE = um.mae_config("S/2", IMAGE, 4, decoder_width=16, decoder_heads=2, decoder_depth=1, **TINY)
TARGET = um.dit_config("S/2", IMAGE, 4, num_classes=5, norm_affine=True, **TINY)


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _transfer(source=SOURCE, target=TARGET, seed=0):
    pretrained = random_params(um.Model(source), seed)
    fresh = random_params(um.Model(target), seed + 1)
    params, copied = um.encoder_into_dit(pretrained, source, target, fresh)
    return pretrained, fresh, params, copied


def test_the_encoder_is_copied_and_everything_else_stays_fresh():
    pretrained, fresh, params, copied = _transfer()
    pre, new, got = _flat(pretrained), _flat(fresh), _flat(params)
    assert set(got) == set(new)  # the DiT's tree: no decoder, mask token or CLS came along
    leaves = [(m, n) for m in um.transfer.BLOCK_MODULES for n in ("w", "b")] + \
             [(m, n) for m in um.transfer.BLOCK_NORMS for n in ("scale", "offset")]
    want = {"['encoder']['patch_embed']['w']", "['encoder']['patch_embed']['b']"} | {
        f"['encoder']['block_{i}/{m}']['{n}']" for i in range(2) for m, n in leaves}
    assert set(copied) == want and len(copied) == 2 + 2 * 12
    for k in got:
        np.testing.assert_array_equal(got[k], pre[k] if k in want else new[k], err_msg=k)
    # Fresh: AdaLN modulation (so the gates start at zero in a real init), time and label
    # embeddings, final layer. Not taken: anything of the pretraining's decoder.
    assert any("adaln" in k for k in set(got) - want)
    assert any("label_embed" in k for k in set(got) - want)
    assert not any(k.startswith("['decoder']") and "block" in k for k in got)
    # ``fresh`` itself is left as it was.
    for k, v in _flat(fresh).items():
        np.testing.assert_array_equal(v, new[k])


def test_a_copied_block_is_the_pretrained_block_once_its_gates_open():
    """AdaLN with zero weights and bias (shift 0, scale 0, gate 1) is the plain pre-norm
    block: the DiT's block_1 must then map tokens exactly as the MAE's block_1 does."""
    pretrained, _, params, _ = _transfer(seed=4)
    w = TARGET.width
    block = {k.split("/", 1)[1]: v for k, v in params["encoder"].items() if k.startswith("block_1/")}
    bias = np.concatenate([np.zeros(2 * w), np.ones(w), np.zeros(2 * w), np.ones(w)]).astype(np.float32)
    block["adaln"] = {"w": np.zeros_like(block["adaln"]["w"]), "b": bias}
    source = {k.split("/", 1)[1]: v for k, v in pretrained["encoder"].items() if k.startswith("block_1/")}

    def run(adaln, p, x, cond):
        f = hk.transform(lambda x, c: um.make_block(adaln, TARGET.num_heads, TARGET.mlp_ratio, True,
                                                    TARGET.norm_eps, None, name="b")(x, c))
        return f.apply({f"b/{k}": v for k, v in p.items()}, None, x, cond)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7, w)).astype(np.float32)
    cond = rng.standard_normal((3, w)).astype(np.float32)
    dit_out = jax.jit(run, static_argnums=0)(True, block, x, cond)
    mae_out = jax.jit(run, static_argnums=0)(False, source, x, cond)
    assert float(jnp.max(jnp.abs(mae_out - x))) > 0.1  # the block does something
    np.testing.assert_allclose(np.asarray(dit_out), np.asarray(mae_out), rtol=1e-5, atol=1e-5)


@settings(max_examples=8, deadline=None)
@given(g=st.integers(2, 6), grid=st.integers(2, 9), w=st.sampled_from([1, 4]), seed=st.integers(0, 2**31 - 1))
def test_pos_embed_interpolation_keeps_tables_it_can(g, grid, w, seed):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((g * g, w)).astype(np.float32)
    out = np.asarray(um.interpolate_pos_embed(table, grid))
    assert out.shape == (grid * grid, w) and out.dtype == np.float32
    if g == grid:
        np.testing.assert_array_equal(out, table)
    # A table that is the same at every position is the same at every new one.
    const = np.broadcast_to(table[:1], table.shape)
    np.testing.assert_allclose(np.asarray(um.interpolate_pos_embed(const, grid)),
                               np.broadcast_to(table[:1], (grid * grid, w)), rtol=1e-5, atol=1e-5)
    # Row-major layout survives: a table depending on the column only still does.
    cols = np.tile(np.arange(g, dtype=np.float32), g)[:, None] * np.ones((1, w), np.float32)
    res = np.asarray(um.interpolate_pos_embed(cols, grid)).reshape(grid, grid, w)
    np.testing.assert_allclose(res, np.broadcast_to(res[:1], res.shape), atol=1e-5)


def test_a_learned_table_goes_to_a_learned_table_on_the_dits_grid():
    source = um.umd_config("S/2", IMAGE, 4, num_cls_tokens=1, adaln=False, **TINY, decoder_depth=1)
    target = um.dit_config("S/2", 2 * IMAGE, 4, norm_affine=True, pos_embed="learned", **TINY)
    pretrained, _, params, copied = _transfer(source, target, seed=5)
    assert "['encoder']['~']['pos_embed']" in copied
    np.testing.assert_allclose(
        params["encoder"]["~"]["pos_embed"],
        um.interpolate_pos_embed(pretrained["encoder"]["~"]["pos_embed"], target.grid_size), rtol=1e-6)
    assert params["encoder"]["~"]["pos_embed"].shape == (target.num_tokens, target.width)


@pytest.mark.parametrize("target,field", [
    (um.dit_config("S/2", IMAGE, 4, **TINY), "norm_affine"),  # DiT's own affine-free norms
    (um.dit_config("S/2", IMAGE, 4, norm_affine=True, **dict(TINY, depth=3)), "depth"),
    (um.dit_config("S/2", IMAGE, 4, norm_affine=True, **dict(TINY, width=64)), "width"),
    (um.dit_config("S/2", IMAGE, 4, norm_affine=True, **dict(TINY, num_heads=4)), "num_heads"),
    (um.dit_config("S/4", IMAGE, 4, norm_affine=True, **TINY), "patch_size"),
    (um.dit_config("S/2", IMAGE, 3, norm_affine=True, **TINY), "in_channels"),
    (um.mae_config("S/2", IMAGE, 4, **TINY), "adaln"),
])
def test_what_does_not_fit_is_refused_naming_the_field(target, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        um.encoder_into_dit(random_params(um.Model(SOURCE)), SOURCE, target,
                            random_params(um.Model(target)))


def test_a_checkpoint_of_another_model_is_refused_naming_the_parameter():
    pretrained = random_params(um.Model(SOURCE))
    del pretrained["encoder"]["block_1/mlp/fc2"]
    with pytest.raises(ValueError, match=r"no \['encoder'\]\['block_1/mlp/fc2'\]\['w'\]"):
        um.encoder_into_dit(pretrained, SOURCE, TARGET, random_params(um.Model(TARGET)))
    pretrained = random_params(um.Model(SOURCE))
    pretrained["encoder"]["patch_embed"]["w"] = np.zeros((3, 32), np.float32)
    with pytest.raises(ValueError, match=r"patch_embed/w has shape \(3, 32\)"):
        um.encoder_into_dit(pretrained, SOURCE, TARGET, random_params(um.Model(TARGET)))


@pytest.mark.parametrize("g,grid", [(8, 12), (6, 16), (5, 9)])
def test_pos_embed_upsampling_is_bicubic_on_the_row_major_grid(g, grid):
    """Keys' bicubic kernel (a = -0.5) reproduces a quadratic exactly wherever its four
    taps lie inside the grid; a new position (r, c) sits at (r + 0.5) g / grid - 0.5 of
    the old grid (pixel centres aligned). Nearest-neighbour or bilinear resizing, a
    mirrored grid, or rows and columns swapped all miss the closed form."""
    def f(y, x):  # different in rows and columns, curved in both
        return np.stack([1.0 + 0.5 * y + 0.3 * y * y - 0.2 * x + 0.1 * x * x,
                         2.0 * x - y + 0.25 * x * y], axis=-1)

    i, j = np.meshgrid(np.arange(g, dtype=np.float64), np.arange(g, dtype=np.float64), indexing="ij")
    table = f(i, j).reshape(g * g, 2).astype(np.float32)
    out = np.asarray(um.interpolate_pos_embed(table, grid)).reshape(grid, grid, 2)
    pos = (np.arange(grid) + 0.5) * g / grid - 0.5
    inside = (pos >= 1) & (pos <= g - 2)
    assert inside.sum() >= 2
    y, x = np.meshgrid(pos[inside], pos[inside], indexing="ij")
    np.testing.assert_allclose(out[np.ix_(inside, inside)], f(y, x), rtol=1e-4, atol=1e-4)


def test_blocks_split_between_encoder_and_decoder_keep_their_order():
    """Block i of the pretrained encoder goes to the DiT's i-th block, counting on into
    its decoder: with two decoder blocks a reversed or shifted decoder mapping shows (the
    other tests' targets have at most one)."""
    source = um.mae_config("S/2", IMAGE, 4, decoder_width=16, decoder_heads=2, decoder_depth=1,
                           width=32, num_heads=2, depth=5)
    target = um.dit_config("S/2", IMAGE, 4, num_classes=5, norm_affine=True, width=32, num_heads=2,
                           depth=2, decoder_depth=3, decoder_width=32, decoder_heads=2)
    pretrained, _, params, copied = _transfer(source, target, seed=7)
    for i in range(5):
        where, j = ("encoder", i) if i < 2 else ("decoder", i - 2)
        for module in um.transfer.BLOCK_MODULES:
            for leaf in ("w", "b"):
                np.testing.assert_array_equal(
                    params[where][f"block_{j}/{module}"][leaf],
                    pretrained["encoder"][f"block_{i}/{module}"][leaf], err_msg=f"{where} {j} {module}")
                assert f"['{where}']['block_{j}/{module}']['{leaf}']" in copied
