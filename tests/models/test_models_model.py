"""The composed model: shapes for every preset, masking equivalences, the
side-interpolater, K-token encoder, tracing counts, representations, dtypes; the
decoder on masked input, the side-interpolater's hidden slots and the pooled
representation against float64 numpy forwards built from the parameters."""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import unidiff.models as um
from models_testlib import (
    IMAGE, NUM_CLASSES, assert_close, host_cast, inputs, jit, np_block, np_dense, np_fill_hidden, np_norm,
    np_params, np_rel_bias, np_silu, random_params, tiny_configs,
)
from unidiff.corruption.masking import Masking, num_kept, random_masking
from unidiff.corruption.patches import patchify
from unidiff.models.layers import sincos_2d

CONFIGS = tiny_configs()
L = (IMAGE // 2) ** 2
RATIOS = (0.75, 0.375)  # UMD's clean / noisy branch keep counts: K = 4 and 10 of 16


@functools.lru_cache(maxsize=None)
def built(name):
    """(model, random params, jitted apply) per preset, shared so each shape compiles once."""
    model = um.Model(CONFIGS[name])
    return model, random_params(model, seed=11), jit(model.apply)


_random_masking = jit(random_masking, static_argnums=(1, 2, 3))


def _masking(batch, ratio, seed=2):
    return _random_masking(jax.random.key(seed), batch, L, ratio)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_output_shapes_for_every_preset(name):
    cfg = CONFIGS[name]
    model, params, _ = built(name)
    x, t, labels = inputs(cfg)
    p = cfg.patch_dim
    heads = {"x0_eps": ("x0", "eps"), "eps_sigma": ("eps", "sigma"), "eps": ("eps",)}[cfg.output]
    maskings = [None] + [_masking(3, r) for r in RATIOS]
    for masking in maskings:
        if masking is not None and not cfg.mask_token:
            with pytest.raises(ValueError, match="masking"):
                jax.eval_shape(model.apply, params, x, t, labels, masking)
            continue
        pred = jax.eval_shape(model.apply, params, x, t, labels, masking)
        for head in ("x0", "eps", "sigma"):
            value = getattr(pred, head)
            if head in heads:
                assert value.shape == (3, L, p) and value.dtype == jnp.float32, (name, head)
            else:
                assert value is None
    assert [m.ids_keep.shape[1] for m in maskings[1:]] == [num_kept(L, r) for r in RATIOS] == [4, 10]
    enc = jax.eval_shape(model.encode, params, x, t, labels, maskings[1] if cfg.mask_token else None)
    k = 4 if cfg.mask_token else L
    assert enc.tokens.shape == (3, k, cfg.width) and enc.rep.shape == enc.cond.shape == (3, cfg.width)


def test_dit_takes_masks_once_given_a_mask_token():
    cfg = CONFIGS["dit"].replace(mask_token=True)
    model = um.Model(cfg)
    params = jax.eval_shape(model.init, jax.random.key(0))
    x, t, labels = inputs(cfg)
    assert "mask_token" in params["decoder"]["~"]
    assert jax.eval_shape(model.apply, params, x, t, labels, _masking(3, 0.5)).eps.shape == (3, L, 16)


# umd_si is left out here: the side-interpolater test checks its keep-all path directly
# and the mdt preset runs it inside the full model.
@pytest.mark.parametrize("name", ["dit", "mae", "maskdit", "mdt", "umd"])
def test_keep_all_masking_equals_unmasked_and_inputs_matter(name):
    cfg = CONFIGS[name]
    model, params, apply = built(name)
    x, t, labels = inputs(cfg)
    keep_all = _masking(3, 0.0, seed=5)  # a random permutation with K = L
    assert keep_all.ids_keep.shape == (3, L) and not np.array_equal(np.asarray(keep_all.ids_keep)[0], np.arange(L))
    plain = apply(params, x, t, labels, None)
    permuted = apply(params, x, t, labels, keep_all)
    for a, b in zip(plain, permuted):
        if a is not None:
            assert np.abs(np.asarray(a)).max() > 1e-3  # random params: a non-trivial output
            assert_close(a, b, rtol=1e-4, atol=1e-5)
    # The time step (and the label, when conditional) change the prediction.
    other_t = apply(params, x, jnp.asarray(np.asarray(t) + 7), labels, None)
    assert not np.allclose(plain.eps, other_t.eps, atol=1e-4)
    if cfg.num_classes:
        other_y = apply(params, x, t, jnp.asarray((np.asarray(labels) + 1) % (NUM_CLASSES + 1)), None)
        assert not np.allclose(plain.eps, other_y.eps, atol=1e-4)


def test_side_interpolater_masked_shortcut():
    cfg = CONFIGS["mdt"]
    model, params, _ = built("mdt")
    si = jit(model.side_interpolater.apply)
    sp = params["side_interpolater"]
    pos = np.asarray(sp["~"]["pos_embed"])
    rng = np.random.default_rng(0)
    cond = jnp.asarray(rng.standard_normal((3, cfg.width)).astype(np.float32))

    full_np = rng.standard_normal((3, L, cfg.width)).astype(np.float32)
    full = jnp.asarray(full_np)
    # No mask: exactly "add the position embedding".
    assert_close(si(sp, full, cond, None), np.asarray(full) + pos, 0, 1e-6)

    masking = _masking(3, 0.5)
    visible = jnp.asarray(np.take_along_axis(full_np, np.asarray(masking.ids_keep)[:, :, None], axis=1))
    out = np.asarray(si(sp, visible, cond, masking))
    hidden = np.asarray(masking.mask, bool)
    expected_visible = np.asarray(full) + pos
    assert_close(out[~hidden], expected_visible[~hidden], 0, 1e-6)  # visible pass through
    # Hidden: the block's prediction on q = [visible tokens, mask token in the hidden
    # slots] + pos, in float64 numpy (relative position bias, affine-free AdaLN block).
    p = np_params(sp)
    block = p["block"]

    def reference(fill):
        q = np_fill_hidden(np.asarray(visible, np.float64), masking, fill) + pos
        bias = np_rel_bias(block["attn"]["rel_pos_bias"], cfg.grid_size)
        return np_block(q, np.asarray(cond, np.float64), block, cfg.num_heads, True, bias)

    want = reference(p["~"]["mask_token"])
    assert_close(out[hidden], want[hidden], 1e-4, 1e-4)
    # The mask token matters to every hidden slot (so the check above can fail).
    zero_fill = reference(np.zeros(cfg.width))
    assert (np.abs(zero_fill - want)[hidden].max(-1) > 1e-2).all()

    # A mask that hides nothing makes the masked path equal the unmasked one.
    keep_all = _masking(3, 0.0, seed=9)
    shuffled = jnp.asarray(np.take_along_axis(full_np, np.asarray(keep_all.ids_keep)[:, :, None], axis=1))
    assert_close(si(sp, shuffled, cond, keep_all), np.asarray(full) + pos, 0, 1e-6)


def _all_shapes(jaxpr):
    """Every array shape produced by any equation, recursively through sub-jaxprs."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for param in eqn.params.values():
            subs = param if isinstance(param, (list, tuple)) else [param]
            for sub in subs:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _all_shapes(inner)
    return shapes


@pytest.mark.parametrize("preset", ["umd", "mdt"])
def test_encoder_only_ever_sees_kept_tokens(preset):
    # L = 49 (14x14 image, patch 2) appears in no other dimension of these configs.
    big_l, k = 49, 20
    builder = {"umd": um.umd_config, "mdt": um.mdt_config}[preset]
    cfg = builder("S/2", 14, 3, num_classes=4, width=32, num_heads=2, depth=2, decoder_depth=1)
    model = um.Model(cfg)
    params = jax.eval_shape(model.init, jax.random.key(0))
    x, t = jnp.zeros((3, big_l, cfg.patch_dim)), jnp.zeros((3,), jnp.int32)
    ids_keep = jnp.zeros((3, k), jnp.int32)
    shapes = _all_shapes(jax.make_jaxpr(model.encoder.apply)(params["encoder"], x, t, None, ids_keep).jaxpr)
    assert len(shapes) > 100
    assert not [s for s in shapes if big_l in s], "the encoder computed on all L tokens"
    assert (3, k + cfg.num_cls_tokens, cfg.width) in shapes or (3, k, cfg.width) in shapes
    # The same check does see L when nothing is dropped (so it can fail).
    full = _all_shapes(jax.make_jaxpr(model.encoder.apply)(params["encoder"], x, t, None, None).jaxpr)
    assert any(big_l in s for s in full)


def test_every_transform_traces_once_per_shape():
    cfg = CONFIGS["umd_si"]
    model, params, _ = built("umd_si")
    traces = collections.Counter()

    def counted(name, fn):
        def wrapper(*args):
            traces[name] += 1
            return fn(*args)

        return jit(wrapper)

    enc = counted("encoder", model.encoder.apply)
    si = counted("side_interpolater", model.side_interpolater.apply)
    dec = counted("decoder", model.decoder.apply)
    full = counted("model", model.apply)
    for ratio in RATIOS:
        for seed in (1, 2):  # new values, same shapes
            x, t, labels = inputs(cfg, seed=seed)
            masking = _masking(3, ratio, seed)
            out = enc(params["encoder"], x, t, labels, masking.ids_keep)
            h = si(params["side_interpolater"], out.tokens, out.cond, masking)
            pred = dec(params["decoder"], h, out.rep, out.cond)
            assert_close(pred.eps, full(params, x, t, labels, masking).eps, 1e-5, 1e-6)
    # Two keep counts -> two traces of the shape-dependent pieces; the decoder only
    # ever sees L tokens here, so it traces once.
    assert traces == {"encoder": 2, "side_interpolater": 2, "decoder": 1, "model": 2}


def test_init_blocks_are_identity_and_params_layout():
    cfg = CONFIGS["umd_si"]
    model = um.Model(cfg)
    params = jax.device_get(jit(model.init)(jax.random.key(0)))
    assert set(params) == {"encoder", "side_interpolater", "decoder"}
    enc = params["encoder"]
    assert enc["~"]["cls_tokens"].shape == (cfg.num_cls_tokens, cfg.width)
    assert not np.any(enc["~"]["cls_tokens"])  # zero-initialised
    assert params["side_interpolater"]["~"]["mask_token"].shape == (cfg.width,)
    for piece in params.values():
        for path, leaves in piece.items():
            for name, leaf in leaves.items():
                if name in ("b", "scale", "offset", "mask_token"):
                    assert leaf.ndim == 1, (path, name)
                if path.endswith("adaln") or path.endswith("final_layer/linear"):
                    assert not np.any(leaf), (path, name)  # AdaLN-Zero

    x, t, labels = inputs(cfg)
    ids_keep = _masking(3, 0.5).ids_keep

    def without_blocks(tree):
        return {k: v for k, v in tree.items() if not k.startswith("block")}

    # Every encoder block is the identity at init: dropping them changes nothing. (The
    # decoder and side-interpolater blocks are the same AdaLNBlock with the zero
    # modulation checked above; test_models_blocks shows such a block is the identity.)
    shallow = um.Model(cfg.replace(depth=0, decoder_depth=0))
    deep_out = jit(model.encoder.apply)(enc, x, t, labels, ids_keep)
    flat_out = jit(shallow.encoder.apply)(without_blocks(enc), x, t, labels, ids_keep)
    assert_close(deep_out.tokens, flat_out.tokens, 0, 0)
    assert_close(deep_out.rep, flat_out.rep, 0, 0)


def test_frozen_position_embeddings_are_not_params():
    shapes = jax.eval_shape(um.Model(CONFIGS["dit"]).init, jax.random.key(0))
    assert "~" not in shapes["encoder"]  # no pos_embed, no CLS
    assert set(shapes["decoder"]) == {"final_layer/adaln", "final_layer/linear"}
    mdt = jax.eval_shape(um.Model(CONFIGS["mdt"]).init, jax.random.key(0))
    assert mdt["encoder"]["~"]["pos_embed"].shape == (L, 32)  # MDT: learnable
    assert mdt["encoder"]["block_0/attn"]["rel_pos_bias"].shape == (49, 2)  # (2*4-1)^2 x heads
    assert "side_interpolater" not in jax.eval_shape(um.Model(CONFIGS["umd"]).init, jax.random.key(0))


def test_representation():
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, IMAGE, IMAGE, 3)).astype(np.float32))
    # One CLS token, affine-free final norm: the representation is a LayerNorm output.
    cfg = CONFIGS["umd"].replace(num_cls_tokens=1, norm_affine=False)
    model = um.Model(cfg)
    params = random_params(model, seed=4)
    rep = np.asarray(jit(model.represent)(params, images))
    assert rep.shape == (3, cfg.width)
    assert_close(rep.mean(-1), 0, 0, 1e-5)
    assert_close(rep.var(-1), 1, 1e-3, 1e-3)
    # No CLS tokens: the mean of the encoded patch tokens at t = 0 with no mask.
    cfg0 = CONFIGS["umd"].replace(num_cls_tokens=0)
    model0 = um.Model(cfg0)
    params0 = random_params(model0, seed=5)
    rep0, enc0 = jit(lambda p, im: (model0.represent(p, im, t=3),
                                    model0.encode(p, patchify(im, 2), jnp.full((3,), 3, jnp.int32))))(params0, images)
    assert_close(rep0, np.asarray(enc0.tokens).mean(1), 1e-5, 1e-6)


def _np_decoder(cfg, p, tokens, rep, cond, masking):
    """REFERENCE sec. 2: [pooled CLS rep, cond token (MAE mode)] + visible tokens ->
    (decoder_embed if widths differ) -> hidden slots get the mask token -> + decoder
    position embedding -> blocks -> drop the prepended tokens -> final layer -> x0, eps."""
    extras = ([rep[:, None]] if cfg.num_cls_tokens else []) + ([] if cfg.adaln else [cond[:, None]])
    e = len(extras)
    x = tokens
    if cfg.dec_width != cfg.width:
        seq = np.concatenate(extras + [x], axis=1)
        if cfg.adaln:
            shift, scale = np.split(np_dense(cond, p["decoder_embed"]["adaln"]), 2, axis=-1)
            seq = np_norm(seq, p["decoder_embed"], "norm", shift, scale)
        seq = np_dense(seq, p["decoder_embed"]["linear"])
        extras, x = [seq[:, :e]], seq[:, e:]
    x = np_fill_hidden(x, masking, p["~"]["mask_token"])
    learned = cfg.decoder_pos_embed == "learned"
    x = x + (p["~"]["pos_embed"] if learned else sincos_2d(cfg.dec_width, cfg.grid_size))
    seq = np.concatenate(extras + [x], axis=1)
    for i in range(cfg.decoder_depth):
        seq = np_block(seq, cond, p[f"block_{i}"], cfg.dec_heads, cfg.adaln)
    head = p["final_layer"]
    mod = np.split(np_dense(cond, head["adaln"]), 2, axis=-1) if cfg.adaln else (None, None)
    out = np_dense(np_norm(seq[:, e:], head, "norm", *mod), head["linear"])
    b, length, c = out.shape[0], out.shape[1], cfg.in_channels
    per_pixel = out.reshape(b, length, cfg.patch_size**2, 2 * c)
    return per_pixel[..., :c].reshape(b, length, -1), per_pixel[..., c:].reshape(b, length, -1)


# umd: AdaLN, CLS rep prepended, learned decoder pos-embed, no projection; mae: plain
# blocks, rep + cond tokens, Dense projection, sin-cos; maskdit: AdaLN projection, no CLS.
@pytest.mark.parametrize("name", ["umd", "mae", "maskdit"])
def test_decoder_fills_hidden_slots_with_the_mask_token(name):
    cfg = CONFIGS[name]
    assert cfg.output == "x0_eps" and cfg.decoder_has_mask_token
    model, params, _ = built(name)
    rng = np.random.default_rng(3)
    tokens, rep, cond = (rng.standard_normal(s).astype(np.float32)
                         for s in ((3, 4, cfg.width), (3, cfg.width), (3, cfg.width)))
    masking = _masking(3, RATIOS[0])  # K = 4 of 16: 12 hidden slots per row
    pred = jit(model.decoder.apply)(params["decoder"], tokens, rep, cond, masking.ids_restore)
    p = np_params(params["decoder"])
    args = [np.asarray(a, np.float64) for a in (tokens, rep, cond)]
    x0, eps = _np_decoder(cfg, p, *args, masking)
    assert_close(pred.x0, x0, 1e-4, 1e-4)
    assert_close(pred.eps, eps, 1e-4, 1e-4)
    # A zero fill would give a different output (so the checks above can fail).
    p_zero = dict(p, **{"~": dict(p["~"], mask_token=np.zeros_like(p["~"]["mask_token"]))})
    assert np.abs(_np_decoder(cfg, p_zero, *args, masking)[0] - x0).max() > 1e-2


def _np_represent(cfg, p, images):
    """REFERENCE sec. 2: patches -> Dense + pos; [cond token (MAE mode), CLS tokens] in
    front; blocks; final LayerNorm; mean of the CLS outputs. t = 0, no label."""
    b, ps, g, w = images.shape[0], cfg.patch_size, cfg.grid_size, cfg.width
    patches = images.reshape(b, g, ps, g, ps, -1).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
    half = cfg.frequency_dim // 2
    assert cfg.num_classes == 0 and cfg.freq_order == "sin_cos" and cfg.frequency_dim % 2 == 0
    feats = np.concatenate([np.zeros((b, half)), np.ones((b, half))], axis=1)  # sin(0), cos(0)
    te = p["time_embed"]
    cond = np_silu(np_dense(np_silu(np_dense(feats, te["fc1"])), te["fc2"]))
    x = np_dense(patches, p["patch_embed"])
    x = x + (p["~"]["pos_embed"] if cfg.pos_embed == "learned" else sincos_2d(w, g))
    cls = np.broadcast_to(p["~"]["cls_tokens"], (b, cfg.num_cls_tokens, w))
    extras = ([] if cfg.adaln else [cond[:, None]]) + [cls]
    e = sum(a.shape[1] for a in extras)
    seq = np.concatenate(extras + [x], axis=1)
    for i in range(cfg.depth):
        seq = np_block(seq, cond, p[f"block_{i}"], cfg.num_heads, cfg.adaln)
    seq = np_norm(seq, p, "norm")
    return seq[:, e - cfg.num_cls_tokens : e].mean(1), seq, e


@pytest.mark.parametrize("arch", ["umd", "umd_no_adaln", "mae"])
def test_representation_pools_the_cls_tokens(arch):
    tiny = dict(width=32, num_heads=2)  # P/2: one encoder block
    cfg = {
        "umd": lambda: um.umd_config("P/2", IMAGE, 3, num_classes=0, **tiny),
        "umd_no_adaln": lambda: um.umd_config("P/2", IMAGE, 3, num_classes=0, adaln=False, **tiny),
        "mae": lambda: um.mae_config("P/2", IMAGE, 3, decoder_width=16, decoder_heads=2, decoder_depth=1, **tiny),
    }[arch]()
    assert cfg.num_cls_tokens == (1 if arch == "mae" else 4) and cfg.adaln == (arch == "umd")
    model = um.Model(cfg)
    params = random_params(model, seed=6)
    images = np.random.default_rng(7).uniform(-1, 1, (3, IMAGE, IMAGE, 3)).astype(np.float32)
    rep = jit(model.represent)(params, images)
    want, seq, e = _np_represent(cfg, np_params(params["encoder"]), np.asarray(images, np.float64))
    assert_close(rep, want, 1e-4, 1e-4)
    # Other pools differ, so the check can fail: the first tokens (the condition token
    # in MAE mode) and the patch tokens.
    if not cfg.adaln:
        assert np.abs(seq[:, : cfg.num_cls_tokens].mean(1) - want).max() > 1e-2
    assert np.abs(seq[:, e:].mean(1) - want).max() > 1e-2


def test_bfloat16_params_and_inputs():
    # MDT: relative position bias, side-interpolater, DiT LayerNorms; a keep-all
    # permutation exercises the gather / unshuffle paths and reuses the float32 compile.
    cfg = CONFIGS["mdt"]
    model, _, apply = built("mdt")
    # Smaller weights than elsewhere: with N(0, 0.3^2) weights the tiny random nets
    # amplify activations ~20x, where bfloat16 rounding is no longer a fair measure.
    params = random_params(model, seed=12, scale=0.1)
    x, t, labels = inputs(cfg)
    masking = _masking(3, 0.0, seed=5)
    ref = apply(params, x, t, labels, masking)
    out = apply(host_cast(params, jnp.bfloat16), host_cast(x, jnp.bfloat16), t, labels, masking)
    for a, b in zip(ref, out):
        if a is None:
            continue
        assert b.dtype == jnp.bfloat16 and np.isfinite(np.asarray(b, np.float32)).all()
        err = np.abs(np.asarray(b, np.float32) - np.asarray(a)).max()
        assert err < 0.03 * np.abs(np.asarray(a)).max(), err


def test_bad_inputs_name_the_argument():
    cfg = CONFIGS["umd"]
    model, params, _ = built("umd")
    x, t, labels = inputs(cfg)
    with pytest.raises(ValueError, match="x_t"):
        model.apply(params, x[:, :5], t, labels)
    with pytest.raises(ValueError, match="t:"):
        model.apply(params, x, t[:2], labels)
    with pytest.raises(ValueError, match="labels"):
        model.apply(params, x, t, labels[:1])
    bad = Masking(jnp.zeros((3, 4), jnp.int32), jnp.zeros((3, 9), jnp.int32), jnp.zeros((3, 9)))
    with pytest.raises(ValueError, match="masking"):
        model.apply(params, x, t, labels, bad)
    with pytest.raises(ValueError, match="images"):
        model.represent(params, jnp.zeros((2, IMAGE, IMAGE, 4)))
    with pytest.raises(ValueError, match="config"):
        um.Model({"width": 3})
