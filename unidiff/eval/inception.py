"""Inception-v3 pool-feature network for FID and Inception Score (Haiku, inference only).

The architecture is the one the standard FID statistics are computed with (the TF
"2015-12-05" Inception graph as re-implemented by pytorch-fid): torchvision's
Inception-v3 layout with 1008 output classes, no auxiliary head, and these FID-specific
block variants:

* ``Mixed_5b..5d`` (A blocks) and ``Mixed_6b..6e`` (C blocks): the pooling branch is a
  3x3/1 average pool that does NOT count the zero padding (``count_include_pad=False``).
* ``Mixed_7b`` (first E block): the same padding-excluding average pool.
* ``Mixed_7c`` (second E block): the pooling branch is a 3x3/1 MAX pool.

Every convolution is "BasicConv2d": conv without bias, batch norm (eps 1e-3, inference
statistics), ReLU. Weights are NOT downloaded: they load from a local ``.npz`` file.

Inputs
------
``images`` (N, H, W, C), NHWC, C in {1, 3} (one channel is repeated to three):

* ``uint8`` in [0, 255], or
* floating point in [-1, 1] (the project's pixel convention).

Images whose size is not 299x299 are resized bilinearly (half-pixel centres, no
antialiasing: the same as ``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)`` used by pytorch-fid). Because bilinear resizing is linear, resizing
in [-1, 1] equals pytorch-fid's resize-then-``2x - 1``.

Outputs: ``InceptionOutput(pool (N, 2048), logits (N, 1008), logits_unbiased (N, 1008))``.
``pool`` is the global average of ``Mixed_7c`` (the FID feature). ``logits`` is the
classifier, ``pool @ fc/w + fc/b``; the original Inception Score code takes the softmax
over all 1008 classes of ``pool @ fc/w``, without the bias (the input of its graph's
``softmax/logits/MatMul``; torch-fidelity's ``logits_unbiased``), which is
``logits_unbiased``.

Weights file format
-------------------
A numpy ``.npz`` with one array per Haiku parameter, keyed ``"<module path>/<param>"``,
float32, in Haiku layout. The module paths follow the torch names with ``.`` -> ``/``:

=========================================  ==================  ======================
key                                        shape               torch name
=========================================  ==================  ======================
``Conv2d_1a_3x3/conv/w``                   (3, 3, 3, 32) HWIO  ``Conv2d_1a_3x3.conv.weight`` (OIHW)
``Mixed_5b/branch1x1/bn/scale``            (64,)               ``Mixed_5b.branch1x1.bn.weight``
``.../bn/offset``, ``/bn/mean``, ``/bn/var``                   ``.bn.bias``, ``.bn.running_mean``, ``.bn.running_var``
``fc/w``                                   (2048, 1008)        ``fc.weight`` (1008, 2048), transposed
``fc/b``                                   (1008,)             ``fc.bias``
=========================================  ==================  ======================

To produce it from the standard FID Inception weights used by pytorch-fid
(``pt_inception-2015-12-05-6726825d.pth``, obtained by you on a machine with network
access; nothing here downloads), on any machine with torch installed run::

    python -m unidiff.eval.convert_inception_weights \\
        --input=pt_inception-2015-12-05-6726825d.pth --output=inception_fid.npz

The conversion transposes convolution kernels OIHW -> HWIO and the classifier (out, in) ->
(in, out), renames ``weight/bias/running_mean/running_var`` to ``scale/offset/mean/var``,
fills a missing BN ``weight`` with ones, drops ``num_batches_tracked`` and checks every
key and shape against this network. ``load_inception_params`` re-validates on load.

Shape glossary: N batch; H, W image height/width (299 after resizing); C channels.
"""

from __future__ import annotations

import functools
import os
import zipfile
from typing import Any, Mapping, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Num

from unidiff.outputs import atomic_write

INPUT_SIZE = 299
POOL_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3

CONVERT_HINT = (
    "produce it from the standard FID Inception weights (pt_inception-2015-12-05-6726825d.pth) "
    "with `python -m unidiff.eval.convert_inception_weights --input=<file.pth> --output=<file.npz>` "
    "(see the docstring of unidiff/eval/inception.py)"
)


class InceptionOutput(NamedTuple):
    pool: Float[Array, "n 2048"]
    logits: Float[Array, "n classes"]  # pool @ fc/w + fc/b, the classifier
    logits_unbiased: Float[Array, "n classes"]  # pool @ fc/w, what the Inception Score uses


def preprocess(images: Num[Array, "n h w c"]) -> Float[Array, "n 299 299 3"]:
    """uint8 [0, 255] or float [-1, 1] NHWC -> float32 [-1, 1], 3 channels, 299x299."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"images must be (N, H, W, C) with C in {{1, 3}}, got shape {tuple(images.shape)}"
        )
    if images.dtype == jnp.uint8:
        x = images.astype(jnp.float32) / 127.5 - 1.0
    elif jnp.issubdtype(images.dtype, jnp.floating):
        x = images.astype(jnp.float32)
    else:
        # An int32 image (uint8 + an int32 scalar) would pass as [-1, 1] values up to 255.
        raise ValueError(f"images must be uint8 in [0, 255] or floating point in [-1, 1], "
                         f"got dtype {images.dtype}")
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    n, h, w, c = x.shape
    if (h, w) != (INPUT_SIZE, INPUT_SIZE):
        # antialias=False: plain bilinear as in pytorch-fid's F.interpolate.
        x = jax.image.resize(x, (n, INPUT_SIZE, INPUT_SIZE, c), "bilinear", antialias=False)
    return x


def _pad_pairs(padding: int | tuple[int, int]) -> list[tuple[int, int]]:
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return [(ph, ph), (pw, pw)]


def _basic_conv(
    x: Array,
    name: str,
    out: int,
    kernel: int | tuple[int, int],
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
) -> Array:
    """Conv (no bias) + inference batch norm + ReLU, params under ``name/conv``, ``name/bn``."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    cin = x.shape[-1]
    with hk.name_scope(name):
        with hk.name_scope("conv"):
            w_init = hk.initializers.VarianceScaling(2.0, "fan_in", "truncated_normal")
            w = hk.get_parameter("w", (kh, kw, cin, out), x.dtype, init=w_init)
        with hk.name_scope("bn"):
            scale = hk.get_parameter("scale", (out,), x.dtype, init=jnp.ones)
            offset = hk.get_parameter("offset", (out,), x.dtype, init=jnp.zeros)
            mean = hk.get_parameter("mean", (out,), x.dtype, init=jnp.zeros)
            var = hk.get_parameter("var", (out,), x.dtype, init=jnp.ones)
    y = jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=(stride, stride),
        padding=_pad_pairs(padding),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    inv = scale * jax.lax.rsqrt(var + BN_EPS)
    return jax.nn.relu(y * inv + (offset - mean * inv))


def _max_pool(x: Array, size: int, stride: int, padding: int = 0) -> Array:
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, size, size, 1), (1, stride, stride, 1), pads
    )


def _avg_pool_exclude_pad(x: Array) -> Array:
    """3x3 stride-1 average pool, padding 1, dividing by the number of real pixels."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pads)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pads)
    return total / count


def _block_a(x: Array, name: str, pool_features: int) -> Array:
    with hk.name_scope(name):
        b1 = _basic_conv(x, "branch1x1", 64, 1)
        b5 = _basic_conv(x, "branch5x5_1", 48, 1)
        b5 = _basic_conv(b5, "branch5x5_2", 64, 5, padding=2)
        b3 = _basic_conv(x, "branch3x3dbl_1", 64, 1)
        b3 = _basic_conv(b3, "branch3x3dbl_2", 96, 3, padding=1)
        b3 = _basic_conv(b3, "branch3x3dbl_3", 96, 3, padding=1)
        bp = _basic_conv(_avg_pool_exclude_pad(x), "branch_pool", pool_features, 1)
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


def _block_b(x: Array, name: str) -> Array:
    with hk.name_scope(name):
        b3 = _basic_conv(x, "branch3x3", 384, 3, stride=2)
        bd = _basic_conv(x, "branch3x3dbl_1", 64, 1)
        bd = _basic_conv(bd, "branch3x3dbl_2", 96, 3, padding=1)
        bd = _basic_conv(bd, "branch3x3dbl_3", 96, 3, stride=2)
    return jnp.concatenate([b3, bd, _max_pool(x, 3, 2)], axis=-1)


def _block_c(x: Array, name: str, c7: int) -> Array:
    with hk.name_scope(name):
        b1 = _basic_conv(x, "branch1x1", 192, 1)
        b7 = _basic_conv(x, "branch7x7_1", c7, 1)
        b7 = _basic_conv(b7, "branch7x7_2", c7, (1, 7), padding=(0, 3))
        b7 = _basic_conv(b7, "branch7x7_3", 192, (7, 1), padding=(3, 0))
        bd = _basic_conv(x, "branch7x7dbl_1", c7, 1)
        bd = _basic_conv(bd, "branch7x7dbl_2", c7, (7, 1), padding=(3, 0))
        bd = _basic_conv(bd, "branch7x7dbl_3", c7, (1, 7), padding=(0, 3))
        bd = _basic_conv(bd, "branch7x7dbl_4", c7, (7, 1), padding=(3, 0))
        bd = _basic_conv(bd, "branch7x7dbl_5", 192, (1, 7), padding=(0, 3))
        bp = _basic_conv(_avg_pool_exclude_pad(x), "branch_pool", 192, 1)
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


def _block_d(x: Array, name: str) -> Array:
    with hk.name_scope(name):
        b3 = _basic_conv(x, "branch3x3_1", 192, 1)
        b3 = _basic_conv(b3, "branch3x3_2", 320, 3, stride=2)
        b7 = _basic_conv(x, "branch7x7x3_1", 192, 1)
        b7 = _basic_conv(b7, "branch7x7x3_2", 192, (1, 7), padding=(0, 3))
        b7 = _basic_conv(b7, "branch7x7x3_3", 192, (7, 1), padding=(3, 0))
        b7 = _basic_conv(b7, "branch7x7x3_4", 192, 3, stride=2)
    return jnp.concatenate([b3, b7, _max_pool(x, 3, 2)], axis=-1)


def _block_e(x: Array, name: str, max_pool_branch: bool) -> Array:
    with hk.name_scope(name):
        b1 = _basic_conv(x, "branch1x1", 320, 1)
        b3 = _basic_conv(x, "branch3x3_1", 384, 1)
        b3 = jnp.concatenate(
            [
                _basic_conv(b3, "branch3x3_2a", 384, (1, 3), padding=(0, 1)),
                _basic_conv(b3, "branch3x3_2b", 384, (3, 1), padding=(1, 0)),
            ],
            axis=-1,
        )
        bd = _basic_conv(x, "branch3x3dbl_1", 448, 1)
        bd = _basic_conv(bd, "branch3x3dbl_2", 384, 3, padding=1)
        bd = jnp.concatenate(
            [
                _basic_conv(bd, "branch3x3dbl_3a", 384, (1, 3), padding=(0, 1)),
                _basic_conv(bd, "branch3x3dbl_3b", 384, (3, 1), padding=(1, 0)),
            ],
            axis=-1,
        )
        # The FID graph's last block max-pools here; the one before averages.
        pooled = _max_pool(x, 3, 1, padding=1) if max_pool_branch else _avg_pool_exclude_pad(x)
        bp = _basic_conv(pooled, "branch_pool", 192, 1)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def inception_v3(images: Num[Array, "n h w c"], num_classes: int = NUM_CLASSES) -> InceptionOutput:
    """The FID Inception-v3 forward pass; call inside ``hk.transform`` (see ``make_inception``)."""
    x = preprocess(images)
    x = _basic_conv(x, "Conv2d_1a_3x3", 32, 3, stride=2)
    x = _basic_conv(x, "Conv2d_2a_3x3", 32, 3)
    x = _basic_conv(x, "Conv2d_2b_3x3", 64, 3, padding=1)
    x = _max_pool(x, 3, 2)
    x = _basic_conv(x, "Conv2d_3b_1x1", 80, 1)
    x = _basic_conv(x, "Conv2d_4a_3x3", 192, 3)
    x = _max_pool(x, 3, 2)
    x = _block_a(x, "Mixed_5b", 32)
    x = _block_a(x, "Mixed_5c", 64)
    x = _block_a(x, "Mixed_5d", 64)
    x = _block_b(x, "Mixed_6a")
    x = _block_c(x, "Mixed_6b", 128)
    x = _block_c(x, "Mixed_6c", 160)
    x = _block_c(x, "Mixed_6d", 160)
    x = _block_c(x, "Mixed_6e", 192)
    x = _block_d(x, "Mixed_7a")
    x = _block_e(x, "Mixed_7b", max_pool_branch=False)
    x = _block_e(x, "Mixed_7c", max_pool_branch=True)
    pool = jnp.mean(x, axis=(1, 2))
    # hk.Linear's parameters and init, applied by hand to keep the product without the bias.
    with hk.name_scope("fc"):
        w = hk.get_parameter("w", (POOL_DIM, num_classes), pool.dtype,
                             init=hk.initializers.TruncatedNormal(1.0 / np.sqrt(POOL_DIM)))
        b = hk.get_parameter("b", (num_classes,), pool.dtype, init=jnp.zeros)
    logits_unbiased = pool @ w
    return InceptionOutput(pool=pool, logits=logits_unbiased + b, logits_unbiased=logits_unbiased)


def make_inception(num_classes: int = NUM_CLASSES) -> hk.Transformed:
    """Stateless transform: ``init(key, images) -> params``, ``apply(params, images) -> InceptionOutput``.

    Typical use::

        net = make_inception()
        params = load_inception_params("inception_fid.npz")
        feats = jax.jit(net.apply)(params, images).pool   # (N, 2048)
    """
    return hk.without_apply_rng(hk.transform(lambda images: inception_v3(images, num_classes)))


@functools.lru_cache(maxsize=4)
def _param_shapes(num_classes: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    # Tracing the whole network takes about a second on CPU; the answer never changes.
    net = make_inception(num_classes)
    dummy = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), dummy)
    return tuple((f"{m}/{p}", tuple(v.shape)) for m, d in shapes.items() for p, v in d.items())


def expected_param_shapes(num_classes: int = NUM_CLASSES) -> dict[str, tuple[int, ...]]:
    """Flat ``{"module/param": shape}`` of the network, computed without allocating weights."""
    return dict(_param_shapes(int(num_classes)))


def random_params(seed: int = 0, num_classes: int = NUM_CLASSES) -> dict[str, dict[str, jax.Array]]:
    """He-normal random weights with identity batch norm, built in numpy.

    For tests and smoke runs only (features of a random network are not FID features).
    Much faster than ``make_inception().init`` on CPU, which traces the whole forward pass.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in expected_param_shapes(num_classes).items():
        name = key.rpartition("/")[2]
        if name in ("scale", "var"):
            flat[key] = np.ones(shape, np.float32)
        elif name in ("offset", "mean", "b"):
            flat[key] = np.zeros(shape, np.float32)
        else:  # conv "w" (HWIO) or fc "w" (in, out): fan_in is the product of all but the last dim
            fan_in = int(np.prod(shape[:-1]))
            flat[key] = (rng.standard_normal(shape, np.float32) * np.sqrt(2.0 / fan_in)).astype(
                np.float32
            )
    return unflatten_params(flat)


def flatten_params(params: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Haiku params -> flat ``{"module/param": np.ndarray}`` (the ``.npz`` layout)."""
    return {f"{m}/{p}": np.asarray(v) for m, d in params.items() for p, v in d.items()}


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Flat ``{"module/param": array}`` -> nested Haiku params (split on the last ``/``).

    Arrays become float32 jax arrays; ``jax.ShapeDtypeStruct`` leaves are kept as they are.
    """
    params: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        module, _, name = key.rpartition("/")
        if not isinstance(value, jax.ShapeDtypeStruct):
            value = jnp.asarray(value, jnp.float32)
        params.setdefault(module, {})[name] = value
    return params


def validate_flat_params(
    flat: Mapping[str, Any], source: str, num_classes: int = NUM_CLASSES
) -> None:
    """Raise ValueError naming ``source`` when keys or shapes differ from the network's."""
    expected = expected_param_shapes(num_classes)
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        raise ValueError(
            f"Inception weights file {source!r} does not match the FID Inception-v3: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(extra)} unexpected keys "
            f"(e.g. {extra[:3]}); {CONVERT_HINT}"
        )
    for key, shape in expected.items():
        got = tuple(np.shape(flat[key]))
        if got != shape:
            raise ValueError(
                f"Inception weights file {source!r}: {key!r} has shape {got}, expected {shape}; "
                f"{CONVERT_HINT}"
            )
        if not np.all(np.isfinite(flat[key])):
            raise ValueError(f"Inception weights file {source!r}: {key!r} has non-finite values")


def save_inception_params(path: str | os.PathLike, params: Mapping[str, Mapping[str, Any]]) -> None:
    """Write Haiku params as the flat float32 ``.npz`` that ``load_inception_params`` reads."""
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_params(params).items()}
    with atomic_write(os.fspath(path)) as f:  # a failed write keeps the previous file
        np.savez(f, **flat)


def load_inception_params(
    path: str | os.PathLike, num_classes: int = NUM_CLASSES
) -> dict[str, dict[str, jax.Array]]:
    """Load and validate Inception weights from a LOCAL ``.npz`` (format in the module docstring)."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise ValueError(f"Inception weights file {source!r} not found; {CONVERT_HINT}")
    try:
        data = np.load(source, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(
            f"Inception weights file {source!r} is not a readable .npz ({e}); {CONVERT_HINT}"
        ) from e
    if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy loads as an array
        raise ValueError(f"Inception weights file {source!r} is not an .npz archive; {CONVERT_HINT}")
    try:
        with data:
            flat = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(
            f"Inception weights file {source!r} has an unreadable entry ({e}); {CONVERT_HINT}"
        ) from e
    validate_flat_params(flat, source, num_classes)
    return unflatten_params(flat)
