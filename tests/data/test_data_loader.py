"""make_loader: order, epochs, sharding, determinism, state round-trip, skipping."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unidiff import data as ud


def index_source(n: int, size: int = 8, channels: int = 3) -> ud.SyntheticSource:
    """label == index, so batches reveal which examples they hold."""
    return ud.SyntheticSource(num_examples=n, image_size=size, channels=channels, num_classes=n)


def take(it, k):
    return [next(it) for _ in range(k)]


def loader(src, **kw):
    kw.setdefault("shard_index", 0)
    kw.setdefault("shard_count", 1)
    kw.setdefault("read_threads", 1)
    return ud.make_loader(src, **kw)


def test_batch_structure_and_range():
    it = loader(index_source(20, size=12), batch_size=4, seed=0, image_size=8)
    for b in take(it, 6):
        assert set(b) == {"image", "label"}
        assert b["image"].shape == (4, 8, 8, 3) and b["image"].dtype == np.float32
        assert b["label"].shape == (4,) and b["label"].dtype == np.int32
        assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0


def test_train_pixels_are_the_scaled_source_images():
    """With a full-area crop and no flip, augmentation is the identity + [-1, 1] scaling."""
    src = index_source(12, size=8)
    it = loader(src, batch_size=4, seed=1, crop_area=(1.0, 1.0), flip=False, num_epochs=1)
    for b in it:
        for img, lab in zip(b["image"], b["label"]):
            want = src[int(lab)]["image"].astype(np.float64) / 127.5 - 1.0
            np.testing.assert_allclose(img, want, atol=1e-6)


def test_same_seed_same_batches_different_seed_different():
    src = index_source(32, size=12)
    a = take(loader(src, batch_size=8, seed=3, image_size=8), 5)
    b = take(loader(src, batch_size=8, seed=3, image_size=8), 5)
    c = take(loader(src, batch_size=8, seed=4, image_size=8), 5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not all(np.array_equal(x["label"], z["label"]) for x, z in zip(a, c))
    assert not all(np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))


def test_each_epoch_is_a_fresh_permutation_then_stop():
    n, bs, epochs = 24, 8, 3
    it = loader(index_source(n), batch_size=bs, seed=7, num_epochs=epochs)
    labels = np.concatenate([b["label"] for b in it])  # finite: iteration ends by itself
    assert labels.shape == (n * epochs,)
    per_epoch = labels.reshape(epochs, n)
    for e in range(epochs):
        np.testing.assert_array_equal(np.sort(per_epoch[e]), np.arange(n))
    assert not np.array_equal(per_epoch[0], per_epoch[1])
    assert not np.array_equal(per_epoch[1], per_epoch[2])
    assert not np.array_equal(per_epoch[0], np.arange(n))


def test_augmentation_differs_between_epochs():
    src = index_source(8, size=12)
    it = loader(src, batch_size=8, seed=0, image_size=8, num_epochs=2)
    e0, e1 = next(it), next(it)
    first = {int(l): im for l, im in zip(e0["label"], e0["image"])}
    second = {int(l): im for l, im in zip(e1["label"], e1["image"])}
    assert any(not np.array_equal(first[k], second[k]) for k in range(8))


def test_eval_order_and_drop_remainder():
    it = loader(index_source(10), batch_size=4, seed=0, train=False, num_epochs=1)
    batches = list(it)
    assert len(batches) == 2 and all(b["label"].shape == (4,) for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), np.arange(8))


@settings(max_examples=8, deadline=None)
@given(
    shard_count=st.integers(1, 4),
    local=st.integers(1, 3),
    steps=st.integers(1, 4),
    extra=st.integers(0, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_shards_are_disjoint_cover_and_match_single_process(shard_count, local, steps, extra, seed):
    bs = local * shard_count
    n = bs * steps + extra % bs  # an incomplete trailing global batch: dropped
    src = index_source(n, size=8)
    single = list(loader(src, batch_size=bs, seed=seed, image_size=6, num_epochs=1))
    shards = [
        list(loader(src, batch_size=bs, seed=seed, image_size=6, num_epochs=1,
                    shard_index=p, shard_count=shard_count))
        for p in range(shard_count)
    ]
    assert len(single) == steps and all(len(s) == steps for s in shards)
    seen = [np.concatenate([b["label"] for b in s]) for s in shards]
    for p, q in itertools.combinations(range(shard_count), 2):
        assert not set(seen[p]) & set(seen[q])
    covered = np.sort(np.concatenate(seen))
    np.testing.assert_array_equal(covered, np.sort(np.concatenate([b["label"] for b in single])))
    assert len(set(covered.tolist())) == steps * bs
    # Global batch k == concatenation of the shards' k-th local batches, bit for bit.
    for k in range(steps):
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                np.concatenate([shards[p][k][key] for p in range(shard_count)]), single[k][key])


@pytest.mark.parametrize("consumed", [0, 1, 5])
def test_state_round_trip_gives_identical_next_batches(consumed):
    src = index_source(20, size=12)
    kw = dict(batch_size=6, seed=11, image_size=8)
    it = loader(src, **kw)
    take(it, consumed)  # 5 batches of 6 crosses the 20-example epoch boundary
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 4)
    fresh = loader(src, **kw)
    fresh.set_state(state)
    for want, got in zip(expected, take(fresh, 4)):
        np.testing.assert_array_equal(want["image"], got["image"])
        np.testing.assert_array_equal(want["label"], got["label"])


def test_orbax_checkpoint_round_trip(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    src = index_source(16, size=8)
    it = loader(src, batch_size=4, seed=2)
    take(it, 3)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = take(it, 3)
    fresh = loader(src, batch_size=4, seed=2)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    for want, got in zip(expected, take(fresh, 3)):
        np.testing.assert_array_equal(want["image"], got["image"])
        np.testing.assert_array_equal(want["label"], got["label"])


def test_unreadable_images_are_skipped_and_counted(folder_dir):
    root, expected = folder_dir
    n_bad = sum(v[0] is None for v in expected.values())
    n_good = len(expected) - n_bad
    src = ud.build_source("folder", root, "train")
    it = loader(src, batch_size=1, seed=0, train=False, image_size=8, num_epochs=1)
    batches = list(it)
    assert len(batches) == n_good and it.num_skipped == n_bad == 2
    # Training: two epochs -> each unreadable file is skipped (and counted) once per epoch.
    it = loader(src, batch_size=2, seed=0, image_size=8, num_epochs=2)
    got = sum(b["label"].shape[0] for b in it)
    assert got == 2 * n_good and it.num_skipped == 2 * n_bad


class _Unreadable:
    """A source whose examples all fail to decode (as a folder of git-lfs pointers)."""

    channels, num_classes, latent, image_shape = 3, 2, False, (8, 8, 3)

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return None


@pytest.mark.parametrize("n", [1, 5])
def test_nothing_readable_is_an_error_not_an_endless_skip(n):
    """The training stream repeats, so skipping unreadable examples never ended when none
    was readable: no batch, no error, a log growing without bound."""
    it = loader(_Unreadable(n), batch_size=2, seed=0, image_size=8)
    with pytest.raises(ud.DataError, match=f"{n + 1} unreadable examples in a row, more than the {n}"):
        next(it)
    assert it.num_skipped == n + 1


def test_skip_count_survives_state_round_trip(folder_dir):
    root, _ = folder_dir
    src = ud.build_source("folder", root, "train")
    it = loader(src, batch_size=1, seed=0, train=False, image_size=8)
    take(it, 6)  # 7 files (5 readable, 2 not): one full pass and one more image
    state = it.get_state()
    assert it.num_skipped == 2
    fresh = loader(src, batch_size=1, seed=0, train=False, image_size=8)
    fresh.set_state(state)
    assert fresh.num_skipped == 2


def test_digits_never_flipped_even_when_flip_requested():
    digits = ud.build_source("digits", None, "test")
    originals = {ud.to_unit_range(digits[i]["image"]).tobytes() for i in range(len(digits))}
    it = loader(digits, batch_size=32, seed=0, crop_area=(1.0, 1.0), flip=True)
    images = np.concatenate([b["image"] for b in take(it, 4)])
    assert all(img.tobytes() in originals for img in images)
    # The check has teeth: most digits are not mirror-symmetric.
    assert sum(np.ascontiguousarray(img[:, ::-1]).tobytes() not in originals for img in images) > 64


def test_latent_loader(tmp_path, fakes):
    lat, lab = fakes.write_latents(str(tmp_path), n=8)
    src = ud.build_source("latents", str(tmp_path), "train")
    ev = list(loader(src, batch_size=4, seed=0, train=False, num_epochs=1))
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in ev]), lat)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in ev]), lab)
    tr = loader(src, batch_size=8, seed=0, flip=True)
    flips = []
    for img, l in zip(*next(tr).values()):
        i = int(np.flatnonzero([np.array_equal(img, x) or np.array_equal(img, x[:, ::-1]) for x in lat])[0])
        flips.append(not np.array_equal(img, lat[i]))
    assert any(flips) and not all(flips)
    with pytest.raises(ud.DataError, match="--image_size"):
        loader(src, batch_size=4, seed=0, image_size=8)


@pytest.mark.parametrize("index,count", [(0, 1), (1, 2), (2, 3)])
def test_default_shard_is_jax_process(monkeypatch, index, count):
    """Without an explicit shard the loader yields this JAX process's block of the
    global batch (a multi-process run is simulated by patching jax's process queries)."""
    import jax

    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)
    src = index_source(24)
    a = next(ud.make_loader(src, batch_size=6, seed=0, read_threads=1))
    b = next(loader(src, batch_size=6, seed=0, shard_index=index, shard_count=count))
    np.testing.assert_array_equal(a["label"], b["label"])
    assert len(a["label"]) == 6 // count
    whole = next(loader(src, batch_size=6, seed=0))["label"]
    np.testing.assert_array_equal(a["label"], whole[index * 6 // count:(index + 1) * 6 // count])


def test_worker_processes_match_in_process_and_restore():
    src = index_source(24, size=8)
    kw = dict(batch_size=4, seed=5, image_size=6)
    ref = take(loader(src, **kw), 6)
    it = loader(src, num_workers=1, **kw)
    try:
        got = take(it, 3)
        state = it.get_state()
    finally:
        it.close()
    for want, g in zip(ref[:3], got):
        np.testing.assert_array_equal(want["image"], g["image"])
    fresh = loader(src, num_workers=1, **kw)
    try:
        fresh.set_state(json.loads(json.dumps(state)))
        for want, g in zip(ref[3:], take(fresh, 3)):
            np.testing.assert_array_equal(want["image"], g["image"])
            np.testing.assert_array_equal(want["label"], g["label"])
    finally:
        fresh.close()


def test_steps_per_epoch():
    assert ud.steps_per_epoch(1797, 64) == 28
    assert len(list(loader(ud.build_source("digits", None, "all"), batch_size=64, seed=0,
                           num_epochs=1, train=False))) == 28


def _epoch_orders(seed, order, n=16, epochs=3):
    it = loader(index_source(n), batch_size=n, seed=seed, image_size=8, num_epochs=epochs,
                crop_area=(1.0, 1.0), flip=False, order=order)
    return [tuple(b["label"].tolist()) for b in it]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 2))
def test_neighbouring_seeds_do_not_share_epoch_orders(seed):
    """Grain reseeds each epoch with (shuffle seed + epoch): with --seed itself as the
    shuffle seed, seed s + 1's epoch e was seed s's epoch e + 1, so replicate runs shared
    their data orders. The hashed seed gives each seed its own epochs."""
    a, b = _epoch_orders(seed, "hashed_seed"), _epoch_orders(seed + 1, "hashed_seed")
    assert not set(a) & set(b)
    assert all(sorted(o) == list(range(16)) for o in a + b)  # still permutations
    old_a, old_b = _epoch_orders(seed, "seed_plus_epoch"), _epoch_orders(seed + 1, "seed_plus_epoch")
    assert old_a[1:] == old_b[:-1]  # the flaw, kept only to resume runs begun with it


def test_shuffle_seed_schemes():
    assert ud.shuffle_seed(7, "seed_plus_epoch") == 7 and ud.shuffle_seed(2**32 + 3, "seed_plus_epoch") == 3
    hashed = {ud.shuffle_seed(s) for s in range(1000)}
    assert len(hashed) == 1000 and all(0 <= h < 2**32 for h in hashed)
    with pytest.raises(ud.DataError, match="data order 'sorted'"):
        loader(index_source(4), batch_size=2, seed=0, order="sorted")
