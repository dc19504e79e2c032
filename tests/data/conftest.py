"""Tiny fake datasets on disk, in the exact formats the real ones use."""

from __future__ import annotations

import os
import pickle
import types

import numpy as np
import pytest
from PIL import Image


def hwc_images(rng: np.random.Generator, n: int, size: int, channels: int = 3) -> np.ndarray:
    return rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def to_planes(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> (N, C*H*W) channel-first rows, as in the official npz / CIFAR files."""
    return images.transpose(0, 3, 1, 2).reshape(images.shape[0], -1)


def write_imagenet(root, size: int = 64, counts=(5, 3), val: int = 4, compressed: bool = False, seed: int = 0):
    """train_data_batch_<k>.npz for k = 1..len(counts) (+10 if 3 files) and val_data.npz.

    Returns (train_images, train_labels0, val_images, val_labels0) in the order the
    source must present them (numeric batch order), labels 0-based.
    """
    rng = np.random.default_rng(seed)
    save = np.savez_compressed if compressed else np.savez
    numbers = [1, 2, 10][: len(counts)]
    ims, labs = [], []
    for k, n in zip(numbers, counts):
        im = hwc_images(rng, n, size)
        lab = rng.integers(1, 1001, size=n)
        save(os.path.join(root, f"train_data_batch_{k}.npz"), data=to_planes(im), labels=lab.tolist(), mean=np.zeros(3))
        ims.append(im)
        labs.append(lab - 1)
    vim = hwc_images(rng, val, size)
    vlab = rng.integers(1, 1001, size=val)
    save(os.path.join(root, "val_data.npz"), data=to_planes(vim), labels=vlab)
    return np.concatenate(ims), np.concatenate(labs), vim, vlab - 1


def write_cifar(root, n_per_batch: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        im = hwc_images(rng, n_per_batch, 32)
        lab = rng.integers(0, 10, size=n_per_batch)
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump({b"data": to_planes(im), b"labels": lab.tolist(), b"batch_label": b"x"}, f)
        out[name] = (im, lab)
    return out


def write_folder(root, seed: int = 0):
    """cat/ (2 PNG RGB, 1 grayscale PNG, 1 corrupt .jpg), dog/ (2 JPEG, 1 truncated .png, 1 .txt).

    Returns {relative path: (expected RGB array or None if unreadable, label)}.
    JPEG is lossy, so the expected array of a JPEG is what Pillow decodes.
    """
    rng = np.random.default_rng(seed)
    expected = {}
    os.makedirs(os.path.join(root, "cat"))
    os.makedirs(os.path.join(root, "dog"))
    for i, (h, w) in enumerate([(20, 24), (18, 18)]):
        im = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        rel = f"cat/c{i}.png"
        Image.fromarray(im).save(os.path.join(root, rel))
        expected[rel] = (im, 0)
    gray = rng.integers(0, 256, size=(16, 20), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(os.path.join(root, "cat/c2_gray.PNG"))
    expected["cat/c2_gray.PNG"] = (np.repeat(gray[..., None], 3, axis=-1), 0)
    with open(os.path.join(root, "cat/c3_corrupt.jpg"), "wb") as f:
        f.write(b"this is not a jpeg" + bytes(rng.integers(0, 256, 64, dtype=np.uint8)))
    expected["cat/c3_corrupt.jpg"] = (None, 0)
    for i in range(2):
        im = rng.integers(0, 256, size=(17, 21, 3), dtype=np.uint8)
        rel = f"dog/d{i}.jpeg" if i else f"dog/d{i}.jpg"
        Image.fromarray(im).save(os.path.join(root, rel), quality=95)
        with Image.open(os.path.join(root, rel)) as decoded:
            expected[rel] = (np.asarray(decoded.convert("RGB")), 1)
    full = os.path.join(root, "dog/d2_truncated.png")
    Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(full)
    with open(full, "rb") as f:
        blob = f.read()
    with open(full, "wb") as f:
        f.write(blob[: len(blob) // 2])
    expected["dog/d2_truncated.png"] = (None, 1)
    with open(os.path.join(root, "dog/notes.txt"), "w") as f:
        f.write("not an image")
    return expected


def write_latents(root, n: int = 10, shape=(4, 4, 4), labels: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((n, *shape)).astype(np.float32)
    np.save(os.path.join(root, "latents.npy"), lat)
    lab = None
    if labels:
        lab = rng.integers(0, 5, size=n)
        lab[0] = 4  # so num_classes is 5
        np.save(os.path.join(root, "labels.npy"), lab)
    return lat, lab


@pytest.fixture
def fakes():
    """The writers above, as a fixture (robust to how pytest imports this directory)."""
    return types.SimpleNamespace(
        hwc_images=hwc_images,
        to_planes=to_planes,
        write_imagenet=write_imagenet,
        write_cifar=write_cifar,
        write_folder=write_folder,
        write_latents=write_latents,
    )


@pytest.fixture
def imagenet_dir(tmp_path):
    root = tmp_path / "in64"
    root.mkdir()
    return str(root), write_imagenet(str(root))


@pytest.fixture
def folder_dir(tmp_path):
    root = tmp_path / "folder"
    root.mkdir()
    return str(root), write_folder(str(root))
