"""Every bad-input case stops with a one-line DataError naming the flag or file."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from unidiff import data as ud


def expect_error(fn, *needles):
    with pytest.raises(ud.DataError) as info:
        fn()
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in msg
    for needle in needles:
        assert str(needle) in msg, (needle, msg)
    return msg


def test_unknown_dataset_and_split():
    expect_error(lambda: ud.validate_data("mnist", "/tmp"), "--dataset", "mnist", "imagenet64")
    expect_error(lambda: ud.validate_data("digits", None, "holdout"), "split", "holdout")


@pytest.mark.parametrize("name", ["imagenet64", "imagenet32", "folder", "cifar10", "latents"])
def test_missing_or_empty_data_dir(tmp_path, name):
    missing = tmp_path / "nope"
    expect_error(lambda: ud.validate_data(name, str(missing)), "--data_dir", str(missing), "does not exist")
    expect_error(lambda: ud.validate_data(name, ""), "--data_dir", name)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    expect_error(lambda: ud.validate_data(name, str(a_file)), "--data_dir", "not a directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(lambda: ud.validate_data(name, str(empty)), str(empty))


def test_imagenet_bad_files(tmp_path, fakes):
    d = tmp_path / "a"
    d.mkdir()
    expect_error(lambda: ud.validate_data("imagenet64", str(d)), str(d), "no ImageNet npz batches")
    # Only a val file: the train split still has no batches.
    np.savez(d / "val_data.npz", data=np.zeros((2, 12288), np.uint8), labels=np.ones(2))
    expect_error(lambda: ud.validate_data("imagenet64", str(d)), "train_data_batch")
    assert ud.validate_data("imagenet64", str(d), "val") == (64, 3, 1000, 2)

    bad = d / "train_data_batch_1.npz"
    np.savez(bad, x=np.zeros((2, 12288), np.uint8), y=np.ones(2))
    expect_error(lambda: ud.validate_data("imagenet64", str(d)), str(bad), "'data'")
    np.savez(bad, data=np.zeros((2, 12288), np.uint8), y=np.ones(2))
    expect_error(lambda: ud.validate_data("imagenet64", str(d)), str(bad), "'labels'")
    np.savez(bad, data=np.zeros((2, 3072), np.uint8), labels=np.ones(2))
    expect_error(lambda: ud.validate_data("imagenet64", str(d)), str(bad), "(N, 12288)", "--dataset")
    np.savez(bad, data=np.zeros((2, 12288), np.float32), labels=np.ones(2))
    expect_error(lambda: ud.validate_data("imagenet64", str(d)), str(bad), "uint8")
    np.savez(bad, data=np.zeros((2, 12288), np.uint8), labels=np.ones(3))
    expect_error(lambda: ud.validate_data("imagenet64", str(d)), str(bad), "labels")
    np.savez(bad, data=np.zeros((2, 12288), np.uint8), labels=np.array([0, 5]))
    expect_error(lambda: ud.validate_data("imagenet64", str(d)), str(bad), "1-based")
    bad.write_bytes(b"not a zip file at all")
    expect_error(lambda: ud.validate_data("imagenet64", str(d)), str(bad), "npz")


def test_folder_bad_layouts(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(b"x")
    expect_error(lambda: ud.validate_data("folder", str(flat)), str(flat), "no class subfolders")
    (flat / "cls").mkdir()
    expect_error(lambda: ud.validate_data("folder", str(flat)), str(flat / "cls"), "no .jpg")


def test_folder_of_undecodable_files_is_refused_up_front(tmp_path):
    """Files that only look like images (git-lfs pointers) passed validation, which lists
    but never decodes, and training then skipped through the repeating stream forever."""
    from PIL import Image

    root = tmp_path / "lfs"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(20):
            (root / cls / f"{i}.png").write_text("version https://git-lfs.github.com/spec/v1\n")
    expect_error(lambda: ud.validate_data("folder", str(root)), f"--data_dir={root}",
                 "none of 16 sampled images", "could be decoded")
    # A decodable file among the sampled ones is enough: the loader skips and counts the
    # rest (here half of them are real images).
    for i in range(10):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "a" / f"{i}.png")
    info = ud.validate_data("folder", str(root))
    assert info.num_examples == 40


def test_cifar_bad_files(tmp_path, fakes):
    d = tmp_path / "c"
    d.mkdir()
    fakes.write_cifar(str(d))
    os.remove(d / "data_batch_3")
    expect_error(lambda: ud.validate_data("cifar10", str(d)), str(d / "data_batch_3"), "missing")
    assert ud.validate_data("cifar10", str(d), "test") == (32, 3, 10, 4)
    target = d / "test_batch"
    with open(target, "wb") as f:
        pickle.dump([1, 2, 3], f)
    expect_error(lambda: ud.validate_data("cifar10", str(d), "test"), str(target), "b'data'")
    with open(target, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    expect_error(lambda: ud.validate_data("cifar10", str(d), "test"), str(target), "3072")
    with open(target, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}, f)
    expect_error(lambda: ud.validate_data("cifar10", str(d), "test"), str(target), "0..9")
    target.write_bytes(b"garbage, not a pickle")
    expect_error(lambda: ud.validate_data("cifar10", str(d), "test"), str(target), "pickle")


def test_latent_bad_files(tmp_path):
    d = tmp_path / "l"
    d.mkdir()
    expect_error(lambda: ud.validate_data("latents", str(d)), str(d / "latents.npy"), "missing")
    np.save(d / "latents.npy", np.zeros((3, 4, 4), np.float32))
    expect_error(lambda: ud.validate_data("latents", str(d)), str(d / "latents.npy"), "(N, h, w, c)")
    np.save(d / "latents.npy", np.zeros((3, 4, 4, 4), np.uint8))
    expect_error(lambda: ud.validate_data("latents", str(d)), "float")
    np.save(d / "latents.npy", np.zeros((3, 4, 4, 4), np.float32))
    np.save(d / "labels.npy", np.zeros((2,), np.int64))
    expect_error(lambda: ud.validate_data("latents", str(d)), str(d / "labels.npy"), "(3,)")
    (d / "labels.npy").write_bytes(b"junk")
    expect_error(lambda: ud.validate_data("latents", str(d)), str(d / "labels.npy"))
    os.remove(d / "labels.npy")
    assert ud.validate_data("latents", str(d)) == (4, 4, 0, 3)
    # A non-square grid was accepted here and failed when the loader started.
    np.save(d / "latents.npy", np.zeros((3, 4, 8, 4), np.float32))
    expect_error(lambda: ud.validate_data("latents", str(d)), str(d / "latents.npy"), "square")


def test_loader_argument_errors(folder_dir):
    src = ud.SyntheticSource(num_examples=8, image_size=8)
    kw = dict(seed=0, shard_index=0, shard_count=1)
    expect_error(lambda: ud.make_loader(src, batch_size=0, **kw), "--batch_size")
    expect_error(lambda: ud.make_loader(src, batch_size=4, seed=-1, shard_index=0, shard_count=1), "--seed")
    expect_error(lambda: ud.make_loader(src, batch_size=6, seed=0, shard_index=0, shard_count=4),
                 "--batch_size=6", "divisible", "4")
    expect_error(lambda: ud.make_loader(src, batch_size=4, crop_area=(0.0, 1.0), **kw), "--crop_area")
    expect_error(lambda: ud.make_loader(src, batch_size=16, num_epochs=1, **kw), "--batch_size=16", "8")
    expect_error(lambda: ud.make_loader(src, batch_size=4, image_size=0, **kw), "--image_size")
    folder = ud.build_source("folder", folder_dir[0])
    expect_error(lambda: ud.make_loader(folder, batch_size=2, **kw), "--image_size")


def test_valid_datasets_report_info(tmp_path, fakes, folder_dir):
    assert ud.validate_data("digits") == (16, 1, 10, 1438)
    assert ud.dataset_info("digits", None, "all") == ud.DatasetInfo(16, 1, 10, 1797)
    assert ud.validate_data("synthetic") == (16, 3, 10, 256)
    assert ud.validate_data("folder", folder_dir[0]) == (None, 3, 2, 7)
    d = tmp_path / "in"
    d.mkdir()
    fakes.write_imagenet(str(d))
    assert ud.dataset_info("imagenet64", str(d)) == (64, 3, 1000, 8)
    # A 64x64 set handed to --dataset=imagenet32 names both.
    expect_error(lambda: ud.validate_data("imagenet32", str(d)), "--dataset=imagenet32", "3x64^2")
