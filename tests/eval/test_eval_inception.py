"""FID Inception-v3: architecture vs the torch layout, preprocessing, a real forward, weight files."""

import haiku as hk
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from unidiff.eval import inception as inc
from unidiff.eval.convert_inception_weights import convert_file, convert_state_dict


def _torch_convs():
    """(name, out, in, kh, kw) of every BasicConv2d in torchvision/pytorch-fid Inception-v3."""
    convs = [
        ("Conv2d_1a_3x3", 32, 3, 3, 3),
        ("Conv2d_2a_3x3", 32, 32, 3, 3),
        ("Conv2d_2b_3x3", 64, 32, 3, 3),
        ("Conv2d_3b_1x1", 80, 64, 1, 1),
        ("Conv2d_4a_3x3", 192, 80, 3, 3),
    ]

    def a(name, cin, pool):
        convs.extend([
            (f"{name}.branch1x1", 64, cin, 1, 1), (f"{name}.branch5x5_1", 48, cin, 1, 1),
            (f"{name}.branch5x5_2", 64, 48, 5, 5), (f"{name}.branch3x3dbl_1", 64, cin, 1, 1),
            (f"{name}.branch3x3dbl_2", 96, 64, 3, 3), (f"{name}.branch3x3dbl_3", 96, 96, 3, 3),
            (f"{name}.branch_pool", pool, cin, 1, 1),
        ])
        return 64 + 64 + 96 + pool

    def c(name, c7):
        convs.extend([
            (f"{name}.branch1x1", 192, 768, 1, 1), (f"{name}.branch7x7_1", c7, 768, 1, 1),
            (f"{name}.branch7x7_2", c7, c7, 1, 7), (f"{name}.branch7x7_3", 192, c7, 7, 1),
            (f"{name}.branch7x7dbl_1", c7, 768, 1, 1), (f"{name}.branch7x7dbl_2", c7, c7, 7, 1),
            (f"{name}.branch7x7dbl_3", c7, c7, 1, 7), (f"{name}.branch7x7dbl_4", c7, c7, 7, 1),
            (f"{name}.branch7x7dbl_5", 192, c7, 1, 7), (f"{name}.branch_pool", 192, 768, 1, 1),
        ])

    def e(name, cin):
        convs.extend([
            (f"{name}.branch1x1", 320, cin, 1, 1), (f"{name}.branch3x3_1", 384, cin, 1, 1),
            (f"{name}.branch3x3_2a", 384, 384, 1, 3), (f"{name}.branch3x3_2b", 384, 384, 3, 1),
            (f"{name}.branch3x3dbl_1", 448, cin, 1, 1), (f"{name}.branch3x3dbl_2", 384, 448, 3, 3),
            (f"{name}.branch3x3dbl_3a", 384, 384, 1, 3), (f"{name}.branch3x3dbl_3b", 384, 384, 3, 1),
            (f"{name}.branch_pool", 192, cin, 1, 1),
        ])

    cin = a("Mixed_5b", 192, 32)
    cin = a("Mixed_5c", cin, 64)
    assert a("Mixed_5d", cin, 64) == 288
    convs.extend([
        ("Mixed_6a.branch3x3", 384, 288, 3, 3), ("Mixed_6a.branch3x3dbl_1", 64, 288, 1, 1),
        ("Mixed_6a.branch3x3dbl_2", 96, 64, 3, 3), ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3),
    ])
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        c(name, c7)
    convs.extend([
        ("Mixed_7a.branch3x3_1", 192, 768, 1, 1), ("Mixed_7a.branch3x3_2", 320, 192, 3, 3),
        ("Mixed_7a.branch7x7x3_1", 192, 768, 1, 1), ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
        ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1), ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3),
    ])
    e("Mixed_7b", 1280)
    e("Mixed_7c", 2048)
    return convs


def _fake_torch_state_dict(rng, with_bn_weight=True):
    sd = {}
    for name, out, cin, kh, kw in _torch_convs():
        sd[f"{name}.conv.weight"] = rng.standard_normal((out, cin, kh, kw), np.float32)
        if with_bn_weight:
            sd[f"{name}.bn.weight"] = rng.uniform(0.5, 1.5, out).astype(np.float32)
        sd[f"{name}.bn.bias"] = rng.standard_normal(out).astype(np.float32)
        sd[f"{name}.bn.running_mean"] = rng.standard_normal(out).astype(np.float32)
        sd[f"{name}.bn.running_var"] = rng.uniform(0.5, 2.0, out).astype(np.float32)
        sd[f"{name}.bn.num_batches_tracked"] = np.array(0)
    sd["fc.weight"] = rng.standard_normal((1008, 2048), np.float32)
    sd["fc.bias"] = rng.standard_normal(1008).astype(np.float32)
    return sd


@pytest.fixture(scope="module")
def converted():
    rng = np.random.default_rng(0)
    sd = _fake_torch_state_dict(rng)
    return sd, convert_state_dict(sd)


def test_network_matches_torch_layout_via_conversion(converted):
    sd, flat = converted
    inc.validate_flat_params(flat, "fake.pth")  # every key and shape of the network matched
    assert len(flat) == len(inc.expected_param_shapes())
    w_t = sd["Mixed_6b.branch7x7_2.conv.weight"]  # (O, I, 1, 7)
    w_h = flat["Mixed_6b/branch7x7_2/conv/w"]  # (1, 7, I, O)
    assert w_h[0, 5, 3, 7] == w_t[7, 3, 0, 5]
    np.testing.assert_array_equal(flat["fc/w"], sd["fc.weight"].T)
    np.testing.assert_array_equal(flat["Mixed_7c/branch_pool/bn/var"], sd["Mixed_7c.branch_pool.bn.running_var"])
    # The TF graph has no BN scale: a state dict without it converts with ones.
    flat2 = convert_state_dict({k: v for k, v in sd.items() if not k.endswith("bn.weight")})
    np.testing.assert_array_equal(flat2["Conv2d_1a_3x3/bn/scale"], np.ones(32, np.float32))
    with pytest.raises(ValueError, match="unexpected key"):
        convert_state_dict({"Mixed_5b.branch1x1.linear.weight": np.zeros(3)})


def _param_structs():
    return inc.unflatten_params(
        {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in inc.expected_param_shapes().items()}
    )


def test_output_shapes_for_full_size_and_small_inputs():
    net = inc.make_inception()
    params = _param_structs()
    for images in (
        jax.ShapeDtypeStruct((3, 299, 299, 3), jnp.float32),
        jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.uint8),
        jax.ShapeDtypeStruct((1, 512, 400, 3), jnp.float32),
    ):
        out = jax.eval_shape(net.apply, params, images)
        assert out.pool.shape == (images.shape[0], 2048)
        assert out.logits.shape == (images.shape[0], 1008)


@pytest.fixture(scope="module")
def fid_jaxpr():
    """The traced forward pass (shapes only) and ``{"module/param": jaxpr input var}``."""
    params = _param_structs()
    net = inc.make_inception()
    closed = jax.make_jaxpr(net.apply)(params, jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32))
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    keys = ["/".join(k.key for k in p) for p in paths]
    return closed.jaxpr, dict(zip(keys, closed.jaxpr.invars))


def test_pooling_layout_of_the_fid_variant(fid_jaxpr):
    # Max pools: 2 in the stem, Mixed_6a, Mixed_7a, and Mixed_7c's pool branch (FID variant).
    # Padding-excluding average pools (two windowed sums each): Mixed_5b-5d, 6b-6e, 7b.
    jaxpr, _ = fid_jaxpr
    names = [e.primitive.name for e in jaxpr.eqns]
    assert names.count("reduce_window_max") == 5
    assert names.count("reduce_window_sum") == 2 * 8
    assert names.count("conv_general_dilated") == len(_torch_convs())


def _conv_input(jaxpr, weight):
    """The input (lhs) var of the one convolution whose kernel is the jaxpr input ``weight``."""
    (lhs,) = [
        e.invars[0] for e in jaxpr.eqns
        if e.primitive.name == "conv_general_dilated" and e.invars[1] is weight
    ]
    return lhs


def _slice(jaxpr, source, target):
    """``f(x) -> target`` evaluating only the equations between var ``source`` and var ``target``."""
    needed, eqns = {target}, []
    for e in reversed(jaxpr.eqns):
        if source not in e.outvars and any(v in needed for v in e.outvars):
            eqns.insert(0, e)
            needed.update(v for v in e.invars if not isinstance(v, jax.extend.core.Literal))
    produced = {v for e in eqns for v in e.outvars}
    assert needed - produced == {source}, "the pooled input depends on more than the block input"

    def f(x):
        env = {source: x}
        for e in eqns:
            args = [v.val if isinstance(v, jax.extend.core.Literal) else env[v] for v in e.invars]
            out = e.primitive.bind(*args, **e.params)
            env.update(zip(e.outvars, out if e.primitive.multiple_results else [out]))
        return env[target]

    return f


def _pool3x3_references(x):
    """3x3/1 pools with padding 1 of NHWC ``x``: torch max_pool2d and both avg_pool2d modes."""
    n, h, w, c = x.shape
    pad = np.full((n, h + 2, w + 2, c), np.nan)
    pad[:, 1:-1, 1:-1] = x
    windows = np.stack([pad[:, i : i + h, j : j + w] for i in range(3) for j in range(3)])
    return {
        "max": np.nanmax(windows, axis=0),
        "avg_exclude_pad": np.nanmean(windows, axis=0),  # count_include_pad=False
        "avg_include_pad": np.nansum(windows, axis=0) / 9.0,  # torch's default
    }


# The pool feeding each block's branch_pool conv in pytorch-fid's fid_inception_v3:
# FIDInceptionA (5b-5d), FIDInceptionC (6b-6e) and FIDInceptionE_1 (7b) average without
# counting the padding; FIDInceptionE_2 (7c) max-pools.
FID_POOL_BRANCHES = {
    **{b: "avg_exclude_pad" for b in ("Mixed_5b", "Mixed_5c", "Mixed_5d")},
    **{b: "avg_exclude_pad" for b in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e")},
    "Mixed_7b": "avg_exclude_pad",
    "Mixed_7c": "max",
}


def test_each_block_pool_branch_pools_as_the_fid_variant(fid_jaxpr):
    # Per block, run the traced ops between the block input (what branch1x1 convolves) and the
    # branch_pool conv's input on random values, against independent numpy pools.
    jaxpr, inputs = fid_jaxpr
    rng = np.random.default_rng(0)
    for block, kind in FID_POOL_BRANCHES.items():
        block_in = _conv_input(jaxpr, inputs[f"{block}/branch1x1/conv/w"])
        pooled = _conv_input(jaxpr, inputs[f"{block}/branch_pool/conv/w"])
        assert pooled.aval.shape == block_in.aval.shape, block  # 3x3, stride 1, padding 1
        x = rng.standard_normal(block_in.aval.shape).astype(np.float32)
        got = np.asarray(_slice(jaxpr, block_in, pooled)(jnp.asarray(x)))
        refs = _pool3x3_references(x.astype(np.float64))
        np.testing.assert_allclose(got, refs[kind], atol=1e-5, err_msg=f"{block}: expected {kind}")
        for other, ref in refs.items():
            if other != kind:
                assert not np.allclose(got, ref, atol=1e-3), f"{block} pools as {other}, not {kind}"


@pytest.mark.parametrize(
    "torch_name, cin, out, kernel, stride, padding, with_bn_weight",
    [
        ("Conv2d_1a_3x3", 3, 5, (3, 3), 2, (0, 0), True),
        ("Mixed_7b.branch3x3_2a", 4, 6, (1, 3), 1, (0, 1), False),  # the TF graph has no BN scale
    ],
)
def test_basic_conv_matches_torch_conv_bn_relu_with_converted_bn_statistics(
    torch_name, cin, out, kernel, stride, padding, with_bn_weight
):
    # One BasicConv2d with non-trivial inference statistics (random_params sets BN to the
    # identity), converted from torch names, against torch's conv -> BatchNorm2d(eps=1e-3) ->
    # ReLU computed in numpy. Small variances make eps 1e-3 vs 1e-5 differ by several percent.
    rng = np.random.default_rng(0)
    kh, kw = kernel
    sd = {
        f"{torch_name}.conv.weight": rng.standard_normal((out, cin, kh, kw)) / np.sqrt(cin * kh * kw),
        f"{torch_name}.bn.bias": 0.5 * rng.standard_normal(out),
        f"{torch_name}.bn.running_mean": 2.0 * rng.standard_normal(out),
        f"{torch_name}.bn.running_var": rng.uniform(0.005, 0.05, out),
        f"{torch_name}.bn.num_batches_tracked": np.array(0),
    }
    if with_bn_weight:
        sd[f"{torch_name}.bn.weight"] = rng.uniform(0.5, 1.5, out)
    params = inc.unflatten_params(convert_state_dict(sd))
    scopes = torch_name.split(".")

    def conv(x):
        if len(scopes) == 1:
            return inc._basic_conv(x, scopes[0], out, kernel, stride, padding)
        with hk.name_scope(scopes[0]):
            return inc._basic_conv(x, scopes[1], out, kernel, stride, padding)

    x = rng.standard_normal((2, 9, 8, cin))
    got = np.asarray(hk.without_apply_rng(hk.transform(conv)).apply(params, jnp.asarray(x, jnp.float32)))

    # numpy, torch semantics: NCHW cross-correlation with OIHW weights, then inference BN.
    w = sd[f"{torch_name}.conv.weight"]
    xp = np.pad(x.transpose(0, 3, 1, 2), ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    oh, ow = (xp.shape[2] - kh) // stride + 1, (xp.shape[3] - kw) // stride + 1
    y = np.zeros((x.shape[0], out, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * stride : i * stride + kh, j * stride : j * stride + kw]
            y[:, :, i, j] = np.einsum("ncpq,ocpq->no", patch, w)
    gamma = sd.get(f"{torch_name}.bn.weight", np.ones(out))[:, None, None]
    mean, var = sd[f"{torch_name}.bn.running_mean"], sd[f"{torch_name}.bn.running_var"]
    bn = (y - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-3) * gamma
    want = np.maximum(bn + sd[f"{torch_name}.bn.bias"][:, None, None], 0.0).transpose(0, 2, 3, 1)

    assert got.shape == want.shape == (2, oh, ow, out)
    assert 0.2 < (want > 0).mean() < 0.8  # the ReLU clips some outputs and passes others
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def _torch_bilinear(x, size):
    """Independent numpy bilinear resize, align_corners=False with edge clamping."""

    def axis_weights(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = src - i0
        m = np.zeros((n_out, n_in))
        np.add.at(m, (np.arange(n_out), i0), 1 - lam)
        np.add.at(m, (np.arange(n_out), i1), lam)
        return m

    mh, mw = axis_weights(x.shape[1], size), axis_weights(x.shape[2], size)
    return np.einsum("ph,nhwc,qw->npqc", mh, x, mw)


def test_preprocess_resizes_and_rescales():
    rng = np.random.default_rng(0)
    small = rng.uniform(-1, 1, (2, 17, 23, 3)).astype(np.float32)
    got = np.asarray(inc.preprocess(jnp.asarray(small)))
    assert got.shape == (2, 299, 299, 3)
    np.testing.assert_allclose(got, _torch_bilinear(small.astype(np.float64), 299), atol=1e-5)
    u8 = rng.integers(0, 256, (1, 299, 299, 1), dtype=np.uint8)
    got = np.asarray(inc.preprocess(jnp.asarray(u8)))
    np.testing.assert_allclose(got, np.repeat(u8 / 127.5 - 1.0, 3, axis=-1), atol=1e-6)  # no resize
    with pytest.raises(ValueError, match="C in"):
        inc.preprocess(jnp.zeros((1, 8, 8, 2)))
    # uint8 + an int32 scalar is int32: its 0..255 values are not [-1, 1] floats.
    with pytest.raises(ValueError, match="got dtype int32"):
        inc.preprocess(jnp.asarray(u8) + jnp.int32(0))


def test_average_pool_excludes_padding():
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    got = np.asarray(inc._avg_pool_exclude_pad(x))[0, :, :, 0]
    xn = np.arange(16.0).reshape(4, 4)
    assert got[0, 0] == pytest.approx(xn[:2, :2].mean())  # 4 real pixels, not 9
    assert got[1, 1] == pytest.approx(xn[:3, :3].mean())
    assert got[3, 2] == pytest.approx(xn[2:, 1:4].mean())


def test_random_weight_forward_gives_pool_features():
    params = inc.random_params(0)
    net = inc.make_inception()
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.uniform(-1, 1, (2, 299, 299, 3)), jnp.float32)
    out = jax.jit(net.apply)(params, images)
    pool, logits = np.asarray(out.pool), np.asarray(out.logits)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert np.all(np.isfinite(pool)) and np.all(np.isfinite(logits))
    assert np.all(pool >= 0)  # average of ReLU outputs
    assert pool.std() > 0 and not np.allclose(pool[0], pool[1])
    w = np.asarray(params["fc"]["w"])
    np.testing.assert_allclose(logits, pool @ w, rtol=1e-4, atol=1e-4)
    # The Inception Score's logits leave out the classifier's bias (the original code's
    # softmax/logits/MatMul); random_params has none, so give it one.
    b = rng.standard_normal(1008).astype(np.float32)
    params = {**params, "fc": {**params["fc"], "b": jnp.asarray(b)}}
    out = jax.jit(net.apply)(params, images)
    np.testing.assert_allclose(np.asarray(out.logits_unbiased), pool @ w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.logits), pool @ w + b, rtol=1e-4, atol=1e-4)


def test_convert_file_and_weights_round_trip(tmp_path, converted):
    sd, flat = converted
    torch_named = tmp_path / "pt_inception_state_dict.npz"
    np.savez(torch_named, **sd)
    converted_path = tmp_path / "inception_fid.npz"
    convert_file(str(torch_named), str(converted_path))
    loaded = inc.load_inception_params(converted_path)
    assert inc.flatten_params(loaded).keys() == flat.keys()
    for k, v in inc.flatten_params(loaded).items():
        np.testing.assert_array_equal(v, flat[k])
    again = tmp_path / "again.npz"
    inc.save_inception_params(again, loaded)
    for k, v in inc.flatten_params(inc.load_inception_params(again)).items():
        np.testing.assert_array_equal(v, flat[k])


def test_load_inception_params_rejects_bad_files(tmp_path, converted):
    _, flat = converted
    with pytest.raises(ValueError, match="missing.npz.*convert_inception_weights"):
        inc.load_inception_params(tmp_path / "missing.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="garbage.npz"):
        inc.load_inception_params(garbage)
    partial = tmp_path / "partial.npz"
    np.savez(partial, **{k: v for k, v in list(flat.items())[:-1]})
    with pytest.raises(ValueError, match="partial.npz.*missing"):
        inc.load_inception_params(partial)
    wrong = tmp_path / "wrong_shape.npz"
    bad = dict(flat)
    bad["fc/b"] = np.zeros(1000, np.float32)
    np.savez(wrong, **bad)
    with pytest.raises(ValueError, match="wrong_shape.npz.*fc/b"):
        inc.load_inception_params(wrong)


def test_convert_file_names_bad_output_before_reading_and_unreadable_input(tmp_path):
    """A folder as --output, or --output = --input, failed only after the whole input was
    read and converted, with a traceback; an unreadable .npz input was a zipfile traceback."""
    truncated = tmp_path / "truncated.npz"
    np.savez(truncated, **{"fc.bias": np.zeros(1008, np.float32)})
    truncated.write_bytes(truncated.read_bytes()[:100])
    # The input is unreadable, so naming --output proves the output was checked first.
    with pytest.raises(ValueError, match="--output .*is a folder"):
        convert_file(str(truncated), str(tmp_path))
    with pytest.raises(ValueError, match="--output .*is also the input --input"):
        convert_file(str(truncated), str(truncated))
    with pytest.raises(ValueError, match="--input .*truncated.npz.* not a readable .npz"):
        convert_file(str(truncated), str(tmp_path / "out.npz"))
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(ValueError, match="--input .*single.npz.*not a zip archive"):
        convert_file(str(single), str(tmp_path / "out.npz"))
    text = tmp_path / "text.npz"  # numpy's own message suggested allow_pickle=True
    text.write_text("not weights")
    with pytest.raises(ValueError, match="--input .*text.npz.*not a zip archive") as e:
        convert_file(str(text), str(tmp_path / "out.npz"))
    assert "pickle" not in str(e.value)
    strings = tmp_path / "strings.npz"
    np.savez(strings, **{"fc.bias": np.array(["a", "b"])})
    with pytest.raises(ValueError, match="--input .*strings.npz.*'fc.bias' is not an array of numbers"):
        convert_file(str(strings), str(tmp_path / "out.npz"))
    assert not (tmp_path / "out.npz").exists()


def test_weight_files_survive_a_failed_write(tmp_path, converted, monkeypatch):
    """Both writers opened the destination itself: a write that died part way (disk full,
    a kill) left a truncated file in place of the good weights already there."""
    from unidiff.eval import convert_inception_weights as cw

    sd, flat = converted
    torch_named = tmp_path / "torch_named.npz"
    np.savez(torch_named, **sd)
    out = tmp_path / "new" / "inception_fid.npz"  # a missing folder is created
    cw.convert_file(str(torch_named), str(out))
    copy = tmp_path / "copy.npz"
    inc.save_inception_params(copy, inc.load_inception_params(out))

    def dying_savez(f, **arrays):
        f.write(b"PK\x03\x04 part of a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", dying_savez)
    with pytest.raises(OSError, match="No space"):
        cw.convert_file(str(torch_named), str(out))
    with pytest.raises(OSError, match="No space"):
        inc.save_inception_params(copy, inc.unflatten_params(flat))
    monkeypatch.undo()
    for path in (out, copy):
        for k, v in inc.flatten_params(inc.load_inception_params(path)).items():
            np.testing.assert_array_equal(v, flat[k])
    assert sorted(p.name for p in out.parent.iterdir()) == ["inception_fid.npz"]  # no temp left
