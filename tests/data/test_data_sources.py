"""Each data source on tiny files written in its real on-disk format."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unidiff import data as ud
from unidiff.data import sources as S


def _all(source):
    return [source[i] for i in range(len(source))]


@pytest.mark.parametrize("compressed", [False, True])
def test_imagenet_npz_reads_planes_and_zero_based_labels(tmp_path, fakes, compressed):
    ims, labs, vims, vlabs = fakes.write_imagenet(str(tmp_path), compressed=compressed, counts=(5, 3, 2))
    src = ud.build_source("imagenet64", str(tmp_path), "train")
    # Numeric order: batch_1, batch_2, batch_10 (not lexicographic 1, 10, 2).
    assert [os.path.basename(f) for f in src.files] == [
        "train_data_batch_1.npz", "train_data_batch_2.npz", "train_data_batch_10.npz"]
    assert len(src) == 10 and src.num_classes == 1000 and src.image_shape == (64, 64, 3)
    for i, ex in enumerate(_all(src)):
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == (64, 64, 3)
        np.testing.assert_array_equal(ex["image"], ims[i])
        assert ex["label"] == labs[i] and ex["label"].dtype == np.int32
    # Stored members are memory-mapped; compressed ones fall back to a full load.
    assert all((off is None) == compressed for _, off in src._layout)
    val = ud.build_source("imagenet64", str(tmp_path), "val")
    np.testing.assert_array_equal(np.stack([e["image"] for e in _all(val)]), vims)
    np.testing.assert_array_equal([e["label"] for e in _all(val)], vlabs)
    # A pickled copy (what a Grain worker receives) reads the same rows.
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone[7]["image"], ims[7])


def test_imagenet32_and_subfolder(tmp_path, fakes):
    sub = tmp_path / "Imagenet32_train_npz"
    sub.mkdir()
    ims, labs, _, _ = fakes.write_imagenet(str(sub), size=32, counts=(3,))
    src = ud.build_source("imagenet32", str(tmp_path), "train")
    assert src.image_shape == (32, 32, 3) and len(src) == 3
    np.testing.assert_array_equal(src[2]["image"], ims[2])
    assert ud.dataset_info("imagenet32", str(tmp_path)) == (32, 3, 1000, 3)


def test_folder_classes_rgb_and_unreadable(folder_dir):
    root, expected = folder_dir
    src = ud.build_source("folder", root, "train")
    assert src.classes == ["cat", "dog"] and src.num_classes == 2 and src.channels == 3
    rel = [os.path.relpath(p, root) for p in src.paths]
    assert rel == sorted(expected, key=lambda r: (r.split("/")[0], r))  # .txt is ignored
    for i, r in enumerate(rel):
        want, label = expected[r]
        got = src[i]
        if want is None:
            assert got is None
        else:
            np.testing.assert_array_equal(got["image"], want)
            assert got["image"].shape[-1] == 3 and got["label"] == label


@settings(max_examples=60, deadline=None)
@given(readable=st.lists(st.booleans(), max_size=12), limit=st.integers(0, 14))
def test_readable_examples_take_the_first_readable_ones(readable, limit):
    """A limit counts examples read: unreadable ones (None) are skipped and the scan
    goes on, so the result is the first ``limit`` readable indices (all for 0)."""
    source = [{"label": i} if ok else None for i, ok in enumerate(readable)]
    got = list(ud.readable_examples(source, limit))
    want = [i for i, ok in enumerate(readable) if ok]
    want = want[:limit] if limit else want
    assert [i for i, _ in got] == want
    assert all(ex == {"label": i} for i, ex in got)


def test_readable_examples_on_a_folder_with_broken_files(folder_dir):
    root, expected = folder_dir
    src = ud.build_source("folder", root, "train")
    readable = [i for i in range(len(src)) if src[i] is not None]
    assert 0 < len(readable) < len(src)  # the fixture has broken files among good ones
    assert [i for i, _ in ud.readable_examples(src, len(readable))] == readable
    assert [i for i, _ in ud.readable_examples(src)] == readable
    with pytest.raises(ValueError, match="limit"):
        next(ud.readable_examples(src, -1))


def test_folder_split_subdirectory(tmp_path, fakes):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    fakes.write_folder(str(tmp_path / "train"))
    fakes.write_folder(str(tmp_path / "val"), seed=1)
    tr = ud.build_source("folder", str(tmp_path), "train")
    te = ud.build_source("folder", str(tmp_path), "test")
    assert tr.root.endswith("train") and te.root.endswith("val")
    assert not np.array_equal(tr[0]["image"], te[0]["image"])


def _png_classes(root, names, value):
    from PIL import Image

    for name in names:
        os.makedirs(os.path.join(root, name))
        Image.fromarray(np.full((4, 4, 3), value[name], np.uint8)).save(os.path.join(root, name, "0.png"))


def test_folder_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    """Pillow's convert("RGB") clips a 16-bit grayscale PNG (mode I;16) at 255: a full-range
    ramp came back 255 everywhere but its darkest pixel."""
    from PIL import Image

    ramp = (np.arange(64).reshape(8, 8) * 1024 + 300).astype(np.uint16)
    os.makedirs(tmp_path / "x")
    Image.fromarray(ramp).save(tmp_path / "x" / "16.png")
    assert Image.open(tmp_path / "x" / "16.png").mode.startswith("I")  # really 16-bit on disk
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(tmp_path / "x" / "8.png")
    src = ud.build_source("folder", str(tmp_path), "train")
    sixteen, eight = (src[src.paths.index(str(tmp_path / "x" / n))]["image"] for n in ("16.png", "8.png"))
    assert sixteen.dtype == np.uint8 and sixteen.shape == (8, 8, 3)
    np.testing.assert_array_equal(sixteen, np.repeat((ramp >> 8).astype(np.uint8)[..., None], 3, -1))
    np.testing.assert_array_equal(sixteen, eight)


@pytest.mark.parametrize("held_out", ["test", "val"])
def test_folder_held_out_split_numbers_classes_as_train_does(tmp_path, held_out):
    """A test/ lacking one of train/'s classes numbered its own folders 0..K'-1, so its
    'c' images got the id of train's 'b' and a probe scored them against the wrong class."""
    value = {"a": 10, "b": 120, "c": 230}
    _png_classes(tmp_path / "train", ["a", "b", "c"], value)
    _png_classes(tmp_path / held_out, ["a", "c"], value)
    tr = ud.build_source("folder", str(tmp_path), "train")
    te = ud.build_source("folder", str(tmp_path), "test")
    assert te.classes == tr.classes == ["a", "b", "c"] and te.num_classes == tr.num_classes == 3
    train_label = {int(tr[i]["image"][0, 0, 0]): int(tr[i]["label"]) for i in range(len(tr))}
    for i in range(len(te)):
        assert int(te[i]["label"]) == train_label[int(te[i]["image"][0, 0, 0])]
    assert sorted(int(te[i]["label"]) for i in range(len(te))) == [0, 2]
    assert ud.validate_data("folder", str(tmp_path), "test").num_classes == 3


@pytest.mark.parametrize("dataset", ["folder", "latents"])
def test_val_reads_val_where_test_exists_too(tmp_path, fakes, dataset):
    """'val' and 'validation' used to be read as 'test', so on a train/ val/ test/ tree a
    probe or FID tuned on val/ was scored on test/. Each held-out name reads its own folder;
    a synonym stands in only where the asked folder does not exist."""
    value = {"a": 10, "b": 120}
    marks = {"train": 1, "val": 2, "test": 3}
    for split, mark in marks.items():
        if dataset == "folder":
            _png_classes(tmp_path / split, ["a", "b"], {k: v + mark for k, v in value.items()})
        else:
            (tmp_path / split).mkdir()
            lat, _ = fakes.write_latents(str(tmp_path / split), n=3)
            np.save(tmp_path / split / "latents.npy", np.full_like(lat, mark))

    def mark_of(split):
        src = ud.build_source(dataset, str(tmp_path), split)
        got = {float(src[i]["image"].flat[0]) for i in range(len(src))}
        return {(g - 10) % 110 if dataset == "folder" else g for g in got}

    assert mark_of("val") == mark_of("validation") == {2}
    assert mark_of("test") == {3} and mark_of("train") == {1}
    os.rename(tmp_path / "val", tmp_path / "validation")
    assert mark_of("val") == {2}  # its synonym's folder
    import shutil

    shutil.rmtree(tmp_path / "validation")
    assert mark_of("val") == {3}  # no val folder at all: the held-out test/ stands in


def test_folder_held_out_class_unknown_to_train_is_refused(tmp_path):
    value = {"a": 10, "b": 120, "z": 230}
    _png_classes(tmp_path / "train", ["a", "b"], value)
    _png_classes(tmp_path / "test", ["a", "z"], value)
    with pytest.raises(ud.DataError) as e:
        ud.build_source("folder", str(tmp_path), "test")
    msg = str(e.value)
    assert f"--data_dir={tmp_path}" in msg and "'z'" in msg and "train" in msg and "\n" not in msg, msg


@pytest.mark.parametrize("split", ["test", "val", "validation"])
def test_folder_without_held_out_subfolder_has_no_test_split(folder_dir, split):
    """A flat tree used to serve as its own test split, so a probe tested on its training images."""
    root, expected = folder_dir
    assert len(ud.build_source("folder", root, "train")) == len(expected)  # the whole tree
    with pytest.raises(ud.DataError) as e:
        ud.build_source("folder", root, split)
    msg = str(e.value)
    assert f"--data_dir={root}" in msg and "test/" in msg and "val/" in msg and "\n" not in msg, msg


def test_folder_with_only_a_test_subfolder_has_no_train_split(tmp_path, fakes):
    """Without train/, the tree itself would be the train split, with test/ as one of its classes."""
    (tmp_path / "test").mkdir()
    fakes.write_folder(str(tmp_path / "test"))
    assert ud.build_source("folder", str(tmp_path), "test").classes == ["cat", "dog"]
    with pytest.raises(ud.DataError, match=f"--data_dir={tmp_path} has a test/ or val/ subfolder but no train/"):
        ud.build_source("folder", str(tmp_path), "train")


@pytest.mark.parametrize("dataset", ["folder", "latents"])
def test_split_tree_has_no_all_split(tmp_path, fakes, dataset):
    """'all' read the tree itself: a folder dataset took train/ and test/ for two classes
    ("class folder .../test has no images"), latents looked for a latents.npy beside them."""
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        if dataset == "folder":
            fakes.write_folder(str(tmp_path / split))
        else:
            fakes.write_latents(str(tmp_path / split))
    assert len(ud.build_source(dataset, str(tmp_path), "train")) > 0
    with pytest.raises(ud.DataError) as e:
        ud.build_source(dataset, str(tmp_path), "all")
    msg = str(e.value)
    assert f"--data_dir={tmp_path} is split into train/, test/" in msg and "'all'" in msg, msg
    # A tree without split folders still is its own 'all' split.
    flat = tmp_path / "flat"
    flat.mkdir()
    if dataset == "folder":
        fakes.write_folder(str(flat))
    else:
        fakes.write_latents(str(flat))
    assert len(ud.build_source(dataset, str(flat), "all")) == len(ud.build_source(dataset, str(flat), "train"))


def test_latents_without_held_out_subfolder_has_no_test_split(tmp_path, fakes):
    fakes.write_latents(str(tmp_path))
    assert len(ud.build_source("latents", str(tmp_path), "train")) == 10
    with pytest.raises(ud.DataError, match=f"--data_dir={tmp_path} has no test/ or val/ subfolder"):
        ud.build_source("latents", str(tmp_path), "test")
    (tmp_path / "val").mkdir()
    held_out, _ = fakes.write_latents(str(tmp_path / "val"), n=3, seed=1)
    te = ud.build_source("latents", str(tmp_path), "test")
    np.testing.assert_array_equal(np.stack([te[i]["image"] for i in range(len(te))]), held_out)


def test_latents_held_out_split_numbers_classes_as_train(tmp_path, fakes):
    """The held-out split's num_classes is train's, whichever classes its own labels
    cover; a label that train does not have is an error naming both files."""
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    fakes.write_latents(str(tmp_path / "train"))  # labels 0..4
    fakes.write_latents(str(tmp_path / "val"), n=3, labels=False)
    np.save(tmp_path / "val" / "labels.npy", np.array([0, 1, 1]))
    te = ud.build_source("latents", str(tmp_path), "test")
    assert te.num_classes == ud.build_source("latents", str(tmp_path), "train").num_classes == 5
    assert [int(te[i]["label"]) for i in range(3)] == [0, 1, 1]
    np.save(tmp_path / "val" / "labels.npy", np.array([0, 5, 1]))
    with pytest.raises(ud.DataError, match=r"val/labels.npy: label 5 is not a class of the training split"):
        ud.build_source("latents", str(tmp_path), "test")


def test_cifar10(tmp_path, fakes):
    sub = tmp_path / "cifar-10-batches-py"
    sub.mkdir()
    written = fakes.write_cifar(str(sub))
    tr = ud.build_source("cifar10", str(tmp_path), "train")
    te = ud.build_source("cifar10", str(tmp_path), "test")
    assert len(tr) == 20 and len(te) == 4 and tr.image_shape == (32, 32, 3)
    want = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    want_lab = np.concatenate([written[f"data_batch_{i}"][1] for i in range(1, 6)])
    np.testing.assert_array_equal(np.stack([e["image"] for e in _all(tr)]), want)
    np.testing.assert_array_equal([e["label"] for e in _all(tr)], want_lab)
    np.testing.assert_array_equal(te[3]["image"], written["test_batch"][0][3])
    clone = pickle.loads(pickle.dumps(tr))
    assert clone._images is None  # not shipped to workers...
    np.testing.assert_array_equal(clone[5]["image"], want[5])  # ...but reloaded there


def _bilinear_up2(img: np.ndarray) -> np.ndarray:
    """Independent 2x bilinear upsampling with half-pixel centres and edge clamping."""
    n = img.shape[0]
    centres = (np.arange(2 * n) + 0.5) / 2 - 0.5
    lo = np.clip(np.floor(centres).astype(int), 0, n - 1)
    hi = np.clip(lo + 1, 0, n - 1)
    frac = np.clip(centres - np.floor(centres), 0, 1)
    frac = np.where(centres < 0, 0.0, frac)
    m = np.zeros((2 * n, n))
    m[np.arange(2 * n), lo] += 1 - frac
    m[np.arange(2 * n), hi] += frac
    return m @ img @ m.T


def test_digits_embedded():
    from sklearn.datasets import load_digits

    ref = load_digits()
    full = ud.build_source("digits", None, "all")
    assert len(full) == 1797 and full.num_classes == 10 and full.image_shape == (16, 16, 1)
    assert full.allow_flip is False
    imgs = np.stack([e["image"] for e in _all(full)])
    assert imgs.dtype == np.uint8 and imgs.shape == (1797, 16, 16, 1)
    np.testing.assert_array_equal([e["label"] for e in _all(full)], ref.target)
    for i in (0, 17, 1796):
        want = np.clip(np.round(_bilinear_up2(ref.images[i]) * 255 / 16), 0, 255)
        np.testing.assert_allclose(imgs[i, ..., 0], want, atol=1)
    tr = ud.build_source("digits", None, "train")
    te = ud.build_source("digits", None, "test")
    assert len(tr) + len(te) == 1797 and len(te) == 1797 // 5
    np.testing.assert_array_equal(S.digits_split_indices("test"), np.arange(4, 1797, 5))
    np.testing.assert_array_equal(te[0]["image"], imgs[4])
    np.testing.assert_array_equal(tr[4]["image"], imgs[5])
    assert set(int(te[i]["label"]) for i in range(len(te))) == set(range(10))


@pytest.mark.parametrize("with_labels", [True, False])
def test_latents(tmp_path, fakes, with_labels):
    lat, lab = fakes.write_latents(str(tmp_path), labels=with_labels)
    src = ud.build_source("latents", str(tmp_path), "train")
    assert src.latent and src.image_shape == (4, 4, 4) and len(src) == 10
    assert src.num_classes == (5 if with_labels else 0)
    for i in range(10):
        np.testing.assert_array_equal(src[i]["image"], lat[i])
        assert src[i]["label"] == (lab[i] if with_labels else 0)
    assert ud.dataset_info("latents", str(tmp_path)) == (4, 4, src.num_classes, 10)


def test_synthetic_deterministic():
    a, b = ud.SyntheticSource(8, 16, 3, 4, seed=0), ud.SyntheticSource(8, 16, 3, 4, seed=0)
    c = ud.SyntheticSource(8, 16, 3, 4, seed=1)
    for i in range(8):
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
        assert a[i]["label"] == i % 4
    assert any(not np.array_equal(a[i]["image"], c[i]["image"]) for i in range(8))
    tr, te = ud.build_source("synthetic", None, "train"), ud.build_source("synthetic", None, "test")
    assert not np.array_equal(tr[0]["image"], te[0]["image"])
    with pytest.raises(IndexError):
        a[8]


@settings(max_examples=40, deadline=None)
@given(size=st.integers(0, 300), limit=st.integers(0, 320), seed=st.integers(0, 2**31 - 1))
def test_subset_order_is_all_indices_and_random_when_capped(size, limit, seed):
    order = ud.subset_order(size, limit, seed)
    assert sorted(order.tolist()) == list(range(size))  # every index once
    np.testing.assert_array_equal(order, ud.subset_order(size, limit, seed))  # deterministic
    if not limit or limit >= size:
        np.testing.assert_array_equal(order, np.arange(size))
    elif size >= 100:
        # A class-sorted split of 5 classes: a capped subset of 20% holds more than the
        # first class (index order would hold only classes 0..1 of 5 at most).
        labels = np.arange(size) * 5 // size
        assert len(set(labels[order[: max(limit, size // 5)]].tolist())) >= 3


def test_readable_examples_scan_in_the_given_order():
    source = [{"label": i} if i % 3 else None for i in range(10)]  # 0, 3, 6, 9 unreadable
    got = [i for i, _ in ud.readable_examples(source, 3, order=[9, 8, 6, 5, 4, 1])]
    assert got == [8, 5, 4]


def test_splits_share_examples(tmp_path, fakes):
    """val and test are one split of the in-memory datasets, two of a tree that has both
    folders, and one again where val/ stands in for a missing test/ (or the reverse)."""
    def share(name, data_dir, a, b):
        return ud.splits_share_examples(name, a, ud.build_source(name, data_dir, a),
                                        b, ud.build_source(name, data_dir, b))

    assert not share("digits", None, "train", "test")
    assert share("digits", None, "val", "test")
    assert share("synthetic", None, "all", "test")
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        fakes.write_latents(str(tmp_path / split), n=3)
    assert share("latents", str(tmp_path), "val", "test")  # val/ read for both
    assert not share("latents", str(tmp_path), "train", "val")
    (tmp_path / "test").mkdir()
    fakes.write_latents(str(tmp_path / "test"), n=3)
    assert not share("latents", str(tmp_path), "val", "test")
    assert share("latents", str(tmp_path), "validation", "val")


def test_imagenet64_official_two_part_download_reads_both_parts(tmp_path, fakes):
    # Imagenet64_train_part{1,2}_npz.zip unzip into two folders: batches 1-5 and 6-10.
    parts = {"Imagenet64_train_part1_npz": range(1, 6), "Imagenet64_train_part2_npz": range(6, 11)}
    for part, numbers in parts.items():
        (tmp_path / part).mkdir()
        for k in numbers:
            np.savez(tmp_path / part / f"train_data_batch_{k}.npz",
                     data=np.full((2, 3 * 8 * 8), k, np.uint8), labels=[k, k])
    src = ud.ImageNetNpzSource(str(tmp_path), "train", image_size=8)
    assert len(src) == 20
    assert [int(src[2 * i]["image"][0, 0, 0]) for i in range(10)] == list(range(1, 11))
    assert [int(src[2 * i]["label"]) for i in range(10)] == list(range(10))
    # The same batch in two places is refused, naming both.
    np.savez(tmp_path / "train_data_batch_3.npz", data=np.zeros((2, 3 * 8 * 8), np.uint8),
             labels=[1, 1])
    with pytest.raises(ud.DataError, match="batch 3 is there twice"):
        ud.ImageNetNpzSource(str(tmp_path), "train", image_size=8)


def test_latents_held_out_split_without_labels_where_train_has_them_is_refused(tmp_path, fakes):
    """Its labels would be all 0 (num_classes 0): a probe scored against class 0 alone."""
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
    fakes.write_latents(str(tmp_path / "train"))
    fakes.write_latents(str(tmp_path / "test"), n=3, labels=False)
    with pytest.raises(ud.DataError, match=r"test/labels.npy is missing, but the training split"):
        ud.build_source("latents", str(tmp_path), "test")
    # Unlabeled throughout stays fine.
    os.remove(tmp_path / "train" / "labels.npy")
    assert ud.build_source("latents", str(tmp_path), "test").num_classes == 0


def test_latents_held_out_split_of_another_shape_is_refused(tmp_path, fakes):
    """Latents are not resized, so probe.py fed them to the model and died in a traceback."""
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    fakes.write_latents(str(tmp_path / "train"), shape=(4, 4, 4))
    fakes.write_latents(str(tmp_path / "val"), n=3, shape=(8, 8, 4))
    with pytest.raises(ud.DataError, match=r"val/latents.npy: latents of shape .* \(8, 8, 4\), but "
                       r"the training split's .* \(4, 4, 4\)"):
        ud.build_source("latents", str(tmp_path), "test")
    fakes.write_latents(str(tmp_path / "val"), n=3, shape=(4, 4, 4))
    assert ud.build_source("latents", str(tmp_path), "test").image_shape == (4, 4, 4)


def test_imagenet64_val_in_its_own_download_folder(tmp_path, fakes):
    # The official download unzips Imagenet64_val_npz.zip into a folder of its own, beside
    # the training batches' folder(s): the held-out split is found one level below too.
    train_dir, val_dir = tmp_path / "Imagenet64_train_npz", tmp_path / "Imagenet64_val_npz"
    train_dir.mkdir()
    val_dir.mkdir()
    ims, _, vims, vlabs = fakes.write_imagenet(str(train_dir), counts=(3,), val=4)
    os.rename(train_dir / "val_data.npz", val_dir / "val_data.npz")
    src = ud.build_source("imagenet64", str(tmp_path), "train")
    np.testing.assert_array_equal(np.stack([e["image"] for e in _all(src)]), ims)
    val = ud.build_source("imagenet64", str(tmp_path), "val")
    np.testing.assert_array_equal(np.stack([e["image"] for e in _all(val)]), vims)
    np.testing.assert_array_equal([e["label"] for e in _all(val)], vlabs)
