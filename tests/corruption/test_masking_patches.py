"""Masking invariants and the patchify/unpatchify layout."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unidiff import corruption as uc
from unidiff.corruption.mixing import masking_from_noise

SETTINGS = settings(max_examples=8, deadline=None)
# Few distinct (B, L, ratio) configurations: each one costs an XLA compile.
BATCH = st.just(3)
LENGTH = st.sampled_from([16, 64])
RATIOS = st.sampled_from([0.0, 0.375, 0.75, 0.9])


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _masking(key, b, l, ratio):
    return uc.random_masking(key, b, l, ratio)


@functools.partial(jax.jit, static_argnums=1)
def _from_noise(noise, ratio):
    return masking_from_noise(noise, ratio)


@SETTINGS
@given(
    b=BATCH,
    l=LENGTH,
    ratio=RATIOS,
    seed=st.integers(0, 2**31 - 1),
)
def test_masking_invariants(b, l, ratio, seed):
    m = jax.device_get(_masking(jax.random.key(seed), b, l, ratio))
    k = int(l * (1 - ratio))  # written out, not via num_kept
    assert uc.num_kept(l, ratio) == k
    chex.assert_shape([m.ids_keep], (b, k))
    chex.assert_shape([m.ids_restore, m.mask], (b, l))
    assert m.ids_keep.dtype == np.int32 and m.ids_restore.dtype == np.int32
    assert m.mask.dtype == np.float32
    assert set(np.unique(m.mask)) <= {0.0, 1.0}
    # Exactly K visible tokens per row, and the kept ids are the visible ones.
    np.testing.assert_array_equal((1 - m.mask).sum(axis=1), np.full(b, k))
    np.testing.assert_array_equal(np.take_along_axis(m.mask, m.ids_keep, axis=1), 0.0)
    for row in range(b):
        assert len(set(m.ids_keep[row].tolist())) == k
        # ids_restore is a permutation that inverts the shuffle: the shuffle is its
        # inverse, starts with ids_keep, and token j sits at shuffle position ids_restore[j].
        np.testing.assert_array_equal(np.sort(m.ids_restore[row]), np.arange(l))
        shuffle = np.empty(l, np.int64)
        shuffle[m.ids_restore[row]] = np.arange(l)
        np.testing.assert_array_equal(shuffle[:k], m.ids_keep[row])
        np.testing.assert_array_equal(shuffle[m.ids_restore[row]], np.arange(l))
        # Hidden = shuffle position >= K.
        np.testing.assert_array_equal(m.mask[row], (m.ids_restore[row] >= k).astype(np.float32))


@jax.jit
def _round_trip(m, x, hidden, fill):
    visible = uc.gather_tokens(x, m.ids_keep)
    return (
        visible,
        uc.unshuffle_tokens(visible, m.ids_restore, hidden),
        uc.unshuffle_tokens(visible, m.ids_restore, fill),
    )


@SETTINGS
@given(
    b=BATCH,
    l=LENGTH,
    d=st.just(3),
    ratio=RATIOS,
    seed=st.integers(0, 2**31 - 1),
)
def test_gather_then_unshuffle_reproduces_input(b, l, d, ratio, seed):
    m = _masking(jax.random.key(seed), b, l, ratio)
    x = np.random.default_rng(seed).standard_normal((b, l, d)).astype(np.float32)
    k = m.ids_keep.shape[1]
    ids_restore = np.asarray(m.ids_restore)
    shuffle = np.argsort(ids_restore, axis=1)
    hidden_in_shuffle_order = np.take_along_axis(x, shuffle[:, k:, None], axis=1)
    fill = np.arange(d, dtype=np.float32) + 100.0
    visible, back, filled = jax.device_get(_round_trip(m, x, hidden_in_shuffle_order, fill))
    chex.assert_shape(visible, (b, k, d))
    np.testing.assert_array_equal(visible, np.take_along_axis(x, np.asarray(m.ids_keep)[..., None], axis=1))
    np.testing.assert_array_equal(back, x)
    # With a single fill token (a mask token), hidden slots hold it and visible slots x.
    hidden = np.asarray(m.mask).astype(bool)
    np.testing.assert_array_equal(filled[~hidden], x[~hidden])
    np.testing.assert_array_equal(filled[hidden], np.broadcast_to(fill, (int(hidden.sum()), d)))


def test_gather_tokens_trailing_dims_and_fill_shape_error():
    m = _masking(jax.random.key(0), 3, 16, 0.75)
    x = np.arange(3 * 16 * 3 * 2, dtype=np.float32).reshape(3, 16, 3, 2)
    got = np.asarray(uc.gather_tokens(jnp.asarray(x), m.ids_keep))
    chex.assert_shape(got, (3, 4, 3, 2))
    np.testing.assert_array_equal(got[1, 2], x[1, int(m.ids_keep[1, 2])])
    with pytest.raises(ValueError, match="fill"):
        uc.unshuffle_tokens(jnp.zeros((3, 4, 3)), m.ids_restore, jnp.zeros((3, 11, 3)))


@SETTINGS
@given(seed=st.integers(0, 2**31 - 2), ratio=st.sampled_from([0.375, 0.75]))
def test_different_keys_and_rows_give_different_masks(seed, ratio):
    # L = 64 with K in {16, 40}: a repeat has probability below 1 / C(64, 16) ~ 2e-15.
    a = np.asarray(_masking(jax.random.key(seed), 3, 64, ratio).mask)
    b = np.asarray(_masking(jax.random.key(seed + 1), 3, 64, ratio).mask)
    assert not np.array_equal(a, b)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not np.array_equal(a[i], a[j]), (i, j)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), ratio=st.sampled_from([0.375, 0.75]))
def test_masking_from_noise_is_random_masking(seed, ratio):
    # mix builds its masks with masking_from_noise on its own per-row noise.
    key = jax.random.key(seed)
    want = _masking(key, 3, 16, ratio)
    got = _from_noise(jax.random.uniform(key, (3, 16)), ratio)
    chex.assert_trees_all_equal(got, want)


def test_same_key_same_mask():
    a = _masking(jax.random.key(3), 3, 16, 0.75)
    b = _masking(jax.random.key(3), 3, 16, 0.75)
    chex.assert_trees_all_equal(a, b)


def test_no_masking_is_identity():
    m = uc.no_masking(3, 5)
    np.testing.assert_array_equal(m.mask, np.zeros((3, 5)))
    np.testing.assert_array_equal(m.ids_keep, np.tile(np.arange(5), (3, 1)))
    np.testing.assert_array_equal(m.ids_restore, np.tile(np.arange(5), (3, 1)))


@pytest.mark.parametrize("l,ratio,needle", [
    (4, 1.0, r"mask_ratio must be in \[0, 1\), got 1.0"),
    (4, -0.1, r"mask_ratio must be in \[0, 1\), got -0.1"),
    (4, 0.8, "mask_ratio=0.8 keeps 0 of 4 tokens"),
    (1, 0.5, "mask_ratio=0.5 keeps 0 of 1 tokens"),
    (0, 0.0, "num_tokens must be >= 1, got 0"),
])
def test_num_kept_rejects(l, ratio, needle):
    with pytest.raises(ValueError, match=needle):
        uc.num_kept(l, ratio)


# -- patches ---------------------------------------------------------------------------


@SETTINGS
@given(
    b=st.integers(1, 2),
    p=st.sampled_from([1, 2, 4]),
    gh=st.integers(1, 3),
    gw=st.just(3),
    c=st.sampled_from([1, 3, 4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_patchify_layout_and_inverse(b, p, gh, gw, c, seed):
    h, w = gh * p, gw * p
    img = np.random.default_rng(seed).standard_normal((b, h, w, c)).astype(np.float32)
    tokens = np.asarray(uc.patchify(jnp.asarray(img), p))
    chex.assert_shape(tokens, (b, gh * gw, p * p * c))
    # Raster order: patch (i, j) is token i * gw + j and holds pixels [ip:(i+1)p, jp:(j+1)p].
    for i in range(gh):
        for j in range(gw):
            np.testing.assert_array_equal(
                tokens[:, i * gw + j], img[:, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(b, -1)
            )
    back = np.asarray(uc.unpatchify(jnp.asarray(tokens), p, h, w))
    np.testing.assert_array_equal(back, img)
    np.testing.assert_array_equal(np.asarray(uc.patchify(jnp.asarray(back), p)), tokens)


def test_patch_0_1_holds_second_column_block():
    p = 2
    img = np.arange(1 * 4 * 6 * 3, dtype=np.float32).reshape(1, 4, 6, 3)
    tokens = np.asarray(uc.patchify(jnp.asarray(img), p))
    np.testing.assert_array_equal(tokens[0, 1], img[0, 0:p, p:2 * p].reshape(-1))
    assert uc.grid_size(64, 4) == 16


def test_patch_errors():
    with pytest.raises(ValueError, match="patch_size"):
        uc.patchify(jnp.zeros((1, 6, 6, 3)), 4)
    with pytest.raises(ValueError, match="tile"):
        uc.unpatchify(jnp.zeros((1, 5, 12)), 2, 4, 4)
    with pytest.raises(ValueError, match="patch_size"):
        uc.grid_size(10, 3)


def test_batch_mismatches_and_ranks_are_refused():
    """take_along_axis broadcast a batch of 1 on either side over the other; patchify of
    one image failed with 'not enough values to unpack'."""
    x, ids = jnp.zeros((1, 8, 3)), jnp.zeros((4, 2), jnp.int32)
    with pytest.raises(ValueError, match=r"same B; got x \(1, 8, 3\) and ids \(4, 2\)"):
        uc.gather_tokens(x, ids)
    with pytest.raises(ValueError, match="same B"):
        uc.gather_tokens(jnp.zeros((4, 8, 3)), ids[:1])
    with pytest.raises(ValueError, match=r"visible must be \(B, K, D\) and ids_restore \(B, L\) with the same B"):
        uc.unshuffle_tokens(jnp.zeros((1, 2, 3)), jnp.zeros((4, 8), jnp.int32), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"images must have shape \(B, H, W, C\), got \(8, 8, 3\)"):
        uc.patchify(jnp.zeros((8, 8, 3)), 2)
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, L, p\*p\*C\)"):
        uc.unpatchify(jnp.zeros((16, 12)), 2, 8, 8)


def test_no_masking_has_random_maskings_dtypes_under_x64():
    """With jax_enable_x64 the identity mask came back float64 (random_masking's is
    float32), so ``x * mask`` promoted float32 activations to float64."""
    with jax.enable_x64(True):
        nm, rm = uc.no_masking(2, 4), uc.random_masking(jax.random.key(0), 2, 4, 0.5)
        assert {k: v.dtype for k, v in nm._asdict().items()} == {
            k: v.dtype for k, v in rm._asdict().items()}


def test_unshuffle_refuses_more_visible_tokens_than_positions():
    """K > L ended in a TypeError from broadcast_in_dim about a shape (2, -4, 5)."""
    m = uc.random_masking(jax.random.key(0), 2, 16, 0.75)
    with pytest.raises(ValueError, match="visible has K=20 tokens, more than ids_restore's L=16"):
        uc.unshuffle_tokens(jnp.ones((2, 20, 5)), m.ids_restore, jnp.zeros(5))


def test_a_traced_mask_ratio_is_refused_by_name():
    """A ratio left dynamic under jit ended in TracerBoolConversionError, naming nothing."""
    f = jax.jit(uc.random_masking, static_argnums=(1, 2))
    with pytest.raises(ValueError, match="mask_ratio must be a static Python number"):
        f(jax.random.key(0), 2, 16, 0.5)
