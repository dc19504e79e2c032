"""Random-access data sources (Grain ``RandomAccessDataSource`` compatible).

Every source has ``__len__`` and ``__getitem__(i) -> {"image", "label"}`` plus
``num_classes``, ``image_shape`` ((H, W, C), or None when images vary in size),
``channels``, ``latent`` (True for precomputed latents: float32, no cropping) and
``allow_flip`` (False where mirroring changes meaning, e.g. handwritten digits).
Image sources return ``image`` uint8 (H, W, C) and ``label`` int32 (0-based);
``num_classes`` is 0 for unlabeled data, whose labels are all 0.

Sources validate their files in ``__init__`` and raise :class:`DataError` with a
one-line message naming the flag or file. They stay cheap to pickle (Grain
worker processes receive a copy): big arrays are memory-mapped or reloaded
lazily in each process rather than shipped.

An unreadable image in an image folder makes ``__getitem__`` return ``None``
(and log the path); the loader turns that into a skipped, counted example.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import struct
import threading
import zipfile
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from unidiff.data.errors import DataError

Example = dict[str, Any]

_TEST_SPLITS = ("test", "val", "validation")


def canonical_split(split: str) -> str:
    """'train' | 'test' (aliases 'val', 'validation') | 'all'."""
    if split == "train" or split == "all":
        return split
    if split in _TEST_SPLITS:
        return "test"
    raise DataError(f"split={split!r}: expected 'train', 'test' (or 'val'), or 'all'")


_HELD_OUT_FOLDERS = ("test", "val", "validation")


def _split_folder(root: str, split: str, dataset: str, layout: str) -> str:
    """``root/<split>`` for the folder-per-split datasets (folder, latents).

    Without a ``train`` folder, 'train' is ``root`` itself. Without a test folder
    there is no 'test' split: falling back to ``root`` would make it the training
    data, and a probe or evaluation on it would score the examples it was fit on.
    ``split`` is the name as asked: a held-out split is the folder of that name ('val'
    reads val/ where both val/ and test/ exist, so tuning on val never scores test); the
    other held-out names stand in only where that folder does not exist.
    """
    if split == "train":
        train = os.path.join(root, "train")
        return train if os.path.isdir(train) else root
    # The asked name first, then its synonym (val, validation), then the rest.
    synonyms = ("val", "validation")
    if split in synonyms:
        names = [split, *(n for n in synonyms if n != split), "test"]
    else:
        names = ["test", *synonyms]
    for name in names:
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    raise DataError(
        f"--data_dir={root} has no test/ or val/ subfolder, so --dataset={dataset} has no "
        f"held-out split (its test split would be the training data); put {layout} under "
        f"<data_dir>/train/ and held-out ones under <data_dir>/test/ (or val/)")


def _check_all_split(root: str, dataset: str) -> None:
    """Split 'all' is the tree itself, so it needs a tree without split folders.

    With train/ and test/ (or val/) the split folders would be read as data: a folder
    dataset took 'test' and 'train' for two classes of no images, latents looked for a
    latents.npy beside them.
    """
    present = [n for n in ("train",) + _HELD_OUT_FOLDERS if os.path.isdir(os.path.join(root, n))]
    if present:
        raise DataError(
            f"--data_dir={root} is split into {', '.join(p + '/' for p in present)} so "
            f"--dataset={dataset} has no 'all' split; ask for 'train' or 'test'")


def _require_dir(data_dir: str | os.PathLike | None, dataset: str, expected: str) -> str:
    if data_dir is None or str(data_dir) == "":
        raise DataError(f"--data_dir is empty but --dataset={dataset} needs {expected}")
    path = os.fspath(data_dir)
    if not os.path.exists(path):
        raise DataError(f"--data_dir={path} does not exist (--dataset={dataset} expects {expected})")
    if not os.path.isdir(path):
        raise DataError(f"--data_dir={path} is not a directory (--dataset={dataset} expects {expected})")
    return path


# ----------------------------------------------------------------------------- ImageNet


def _npy_header(stream) -> tuple[tuple[int, ...], np.dtype, bool]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    return shape, dtype, fortran


def _npz_member_layout(path: str, key: str) -> tuple[tuple[int, ...], np.dtype, int | None]:
    """Shape, dtype and byte offset of an uncompressed npz member (offset None if compressed)."""
    member = f"{key}.npy"
    with zipfile.ZipFile(path) as zf:
        if member not in zf.namelist():
            raise DataError(f"{path}: no '{key}' array (keys: {sorted(n[:-4] for n in zf.namelist())}); expected 'data' and 'labels'")
        info = zf.getinfo(member)
        with zf.open(member) as stream:
            shape, dtype, fortran = _npy_header(stream)
            header_len = stream.tell()
    if fortran:
        raise DataError(f"{path}: '{key}' is stored in Fortran order; expected C order as written by np.savez")
    if info.compress_type != zipfile.ZIP_STORED:
        return shape, dtype, None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return shape, dtype, info.header_offset + 30 + name_len + extra_len + header_len


_BATCH_RE = re.compile(r"^train_data_batch_(\d+)\.npz$")


def _find_npz(root: str, split: str) -> list[str]:
    """train_data_batch_<k>.npz (numeric order) or val_data.npz, in root or one level below.

    The training batches are gathered from root and every folder one level below: the
    official ImageNet64 download comes as two archives that unzip into two folders
    (Imagenet64_train_part1_npz/ with batches 1-5, ..._part2_npz/ with 6-10), and
    taking the first folder alone trained on half the data. A batch number found twice
    is an error (which copy to read?).
    """
    candidates = [root] + sorted(
        os.path.join(root, d) for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
    )
    if split == "train":
        found: dict[int, str] = {}
        for folder in candidates:
            for n in os.listdir(folder):
                m = _BATCH_RE.match(n)
                if not m:
                    continue
                path = os.path.join(folder, n)
                k = int(m.group(1))
                if k in found:
                    raise DataError(f"--data_dir={root}: training batch {k} is there twice, "
                                    f"{found[k]} and {path}; keep one copy")
                found[k] = path
        return [found[k] for k in sorted(found)]
    for folder in candidates:
        if "val_data.npz" in os.listdir(folder):
            return [os.path.join(folder, "val_data.npz")]
    return []


class ImageNetNpzSource:
    """Downsampled ImageNet in its official npz batch format.

    Files: ``train_data_batch_1..10.npz`` (train) / ``val_data.npz`` (test), each with
    ``data`` (N, 3*S*S) uint8 rows of channel-first planes and ``labels`` 1..1000.
    Uncompressed members (``np.savez``) are memory-mapped; compressed ones are
    loaded whole on first use in each process.
    """

    num_classes = 1000
    channels = 3
    latent = False
    allow_flip = True

    def __init__(self, data_dir: str, split: str = "train", image_size: int = 64, dataset: str | None = None):
        dataset = dataset or f"imagenet{image_size}"
        split = canonical_split(split)
        if split == "all":
            raise DataError(f"split='all' is not supported for --dataset={dataset}; use 'train' or 'test'")
        expected = "train_data_batch_1..10.npz" if split == "train" else "val_data.npz"
        root = _require_dir(data_dir, dataset, f"ImageNet npz batches ({expected})")
        self.files = _find_npz(root, split)
        if not self.files:
            raise DataError(f"--data_dir={root}: no ImageNet npz batches found for split '{split}' (expected {expected} with keys 'data' and 'labels')")
        self.split = split
        self.image_size = image_size
        self.image_shape = (image_size, image_size, 3)
        row = 3 * image_size * image_size
        labels, offsets, self._layout = [], [0], []
        for path in self.files:
            try:
                shape, dtype, offset = _npz_member_layout(path, "data")
                with np.load(path, allow_pickle=False) as npz:
                    if "labels" not in npz.files:
                        raise DataError(f"{path}: no 'labels' array (keys: {sorted(npz.files)}); expected 'data' and 'labels'")
                    lab = np.asarray(npz["labels"])
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                raise DataError(f"{path}: not a readable npz file ({err})") from None
            if dtype != np.uint8 or len(shape) != 2 or shape[1] != row:
                side = (
                    f" (rows of {shape[1]} = 3x{int(round(math.sqrt(shape[1] / 3)))}^2 values: wrong --dataset?)"
                    if len(shape) == 2 and shape[1] % 3 == 0
                    else ""
                )
                raise DataError(f"{path}: 'data' is {dtype} {tuple(shape)}; --dataset={dataset} expects uint8 (N, {row}) = (N, 3*{image_size}*{image_size}){side}")
            lab = lab.reshape(-1)
            if lab.shape[0] != shape[0]:
                raise DataError(f"{path}: 'labels' has {lab.shape[0]} entries but 'data' has {shape[0]} rows")
            if lab.size and (lab.min() < 1 or lab.max() > 1000):
                raise DataError(f"{path}: 'labels' range [{lab.min()}, {lab.max()}]; expected 1-based class ids in [1, 1000]")
            labels.append(lab.astype(np.int32) - 1)
            offsets.append(offsets[-1] + shape[0])
            self._layout.append((shape, offset))
        self._labels = np.concatenate(labels)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._arrays: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"] = {}  # memmaps are reopened in the receiving process
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _rows(self, file_index: int) -> np.ndarray:
        arr = self._arrays.get(file_index)
        if arr is not None:
            return arr
        with self._lock:  # reader threads must not each load a compressed file
            arr = self._arrays.get(file_index)
            if arr is not None:
                return arr
            shape, offset = self._layout[file_index]
            path = self.files[file_index]
            if offset is None:
                with np.load(path, allow_pickle=False) as npz:
                    arr = np.asarray(npz["data"])
            else:
                arr = np.memmap(path, dtype=np.uint8, mode="r", shape=tuple(shape), offset=offset)
            self._arrays[file_index] = arr
            return arr

    def __getitem__(self, index: int) -> Example:
        index = int(index)
        file_index = int(np.searchsorted(self._offsets, index, side="right")) - 1
        row = np.asarray(self._rows(file_index)[index - self._offsets[file_index]])
        s = self.image_size
        image = np.ascontiguousarray(row.reshape(3, s, s).transpose(1, 2, 0))
        return {"image": image, "label": self._labels[index]}


# ------------------------------------------------------------------------- image folder

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def subset_order(size: int, limit: int = 0, seed: int = 0) -> np.ndarray:
    """The order in which an evaluation scans a split of ``size`` examples when it wants
    ``limit`` of them: index order when ``limit`` is 0 (all) or covers the split, else a
    permutation seeded by ``seed``. A capped evaluation set is thus a random subset, not
    the first ``limit`` examples, which in a class-sorted source (an image folder lists
    its files class by class) would hold only the first classes."""
    if limit < 0:
        raise ValueError(f"limit: must be >= 0, got {limit}")
    if not limit or limit >= size:
        return np.arange(size)
    return np.random.default_rng(seed).permutation(size)


def readable_examples(source, limit: int | None = None, order=None):
    """Yield ``(index, example)`` for the source's readable examples, scanning the indices
    in ``order`` (default: index order; see ``subset_order``), skipping unreadable ones
    (``None``) and stopping after ``limit`` of them (None or 0: all). A limit counts
    examples read, not indices scanned, so a few broken files do not shrink an
    evaluation set."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit: must be >= 0 or None, got {limit}")
    used = 0
    for i in (range(len(source)) if order is None else order):
        if limit and used == limit:
            return
        ex = source[int(i)]
        if ex is None:
            continue
        used += 1
        yield int(i), ex


def _rgb_uint8(im: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 of any image Pillow opens from a .jpg/.jpeg/.png file.

    A 16-bit grayscale PNG opens in mode I;16 (I in older Pillow), which ``convert("RGB")``
    clips at 255 instead of scaling (a full-range image came out nearly all white); keep its
    top 8 bits, as Pillow itself does for 16-bit RGB PNGs.
    """
    if im.mode == "I" or im.mode.startswith("I;16"):
        gray = (np.clip(np.asarray(im).astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _class_folders(root: str) -> list[str]:
    """Sorted names of the visible subfolders of ``root`` (one per class)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


class ImageFolderSource:
    """One subfolder per class (sorted names -> ids 0..K-1), JPEG/PNG read with Pillow.

    The held-out split numbers its classes as ``train/`` does (``classes`` and
    ``num_classes`` are train's), so a class missing from it shifts no label; a class
    folder there with no counterpart in ``train/`` is an error.

    The split lives in ``data_dir/<split>/`` when that folder exists (``val`` and
    ``validation`` are also tried for the test split). A tree with no split folders
    is all training data: its 'train' and 'all' splits are the tree itself, and
    asking it for 'test' is an error, since the only images on offer are the
    training ones; a tree with split folders has no 'all' split. Every image is
    converted to RGB. Unreadable files give ``None``.
    """

    channels = 3
    latent = False
    allow_flip = True
    image_shape = None

    def __init__(self, data_dir: str, split: str = "train"):
        requested, split = split, canonical_split(split)
        root = _require_dir(data_dir, "folder", "one subfolder of .jpg/.jpeg/.png images per class")
        if split == "all":
            _check_all_split(root, "folder")
        else:
            top = root
            root = _split_folder(top, requested, "folder", "one folder of images per class")
            if root == top and any(os.path.isdir(os.path.join(top, n)) for n in _HELD_OUT_FOLDERS):
                # The held-out folder would be read as one more class of training images.
                raise DataError(f"--data_dir={top} has a test/ or val/ subfolder but no train/ "
                                "(--dataset=folder expects both, or neither for training only)")
        self.root = root
        classes = _class_folders(root)
        if not classes:
            raise DataError(f"--data_dir={root} has no class subfolders (--dataset=folder expects <data_dir>/<class_name>/*.jpg|*.jpeg|*.png)")
        ids = classes
        if split == "test" and os.path.isdir(os.path.join(top, "train")):
            # Class ids come from train/: numbering the held-out folder's own (sorted)
            # names would give its classes other ids wherever a class is missing from it.
            train_root = os.path.join(top, "train")
            ids = _class_folders(train_root)
            unknown = sorted(set(classes) - set(ids))
            if unknown:
                raise DataError(f"--data_dir={top}: class folder(s) {unknown[:3]} of {root} have "
                                f"no counterpart in {train_root} (--dataset=folder numbers the "
                                "classes of train/; the held-out split must use the same names)")
        self.classes = ids
        self.num_classes = len(ids)
        self.paths: list[str] = []
        labels: list[int] = []
        label_of = {name: i for i, name in enumerate(ids)}
        for name in classes:
            label = label_of[name]
            folder = os.path.join(root, name)
            files = sorted(
                e.name
                for e in os.scandir(folder)
                if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not files:
                raise DataError(f"--data_dir class folder {folder} has no .jpg/.jpeg/.png images (--dataset=folder)")
            self.paths.extend(os.path.join(folder, f) for f in files)
            labels.extend([label] * len(files))
        self._labels = np.asarray(labels, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Example | None:
        index = int(index)
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                im.load()  # force the full decode so truncated files fail here
                image = _rgb_uint8(im)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            logging.warning("skipping unreadable image %s: %s", path, err)
            return None
        return {"image": image, "label": self._labels[index]}


# ------------------------------------------------------------------------------ CIFAR-10


def _find_cifar(root: str) -> str:
    for folder in (root, os.path.join(root, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(folder, "data_batch_1")) or os.path.isfile(os.path.join(folder, "test_batch")):
            return folder
    return root


class Cifar10Source:
    """CIFAR-10 python batches: ``data_batch_1..5`` (train), ``test_batch`` (test).

    Each is a pickle of a dict with b"data" (N, 3072) uint8 channel-first rows and
    b"labels" (N,) in 0..9. Looked for in ``data_dir`` or ``data_dir/cifar-10-batches-py``.
    """

    num_classes = 10
    channels = 3
    latent = False
    allow_flip = True
    image_shape = (32, 32, 3)

    def __init__(self, data_dir: str, split: str = "train"):
        split = canonical_split(split)
        root = _require_dir(data_dir, "cifar10", "CIFAR-10 python batches (data_batch_1..5, test_batch)")
        folder = _find_cifar(root)
        names = {
            "train": [f"data_batch_{i}" for i in range(1, 6)],
            "test": ["test_batch"],
        }
        names["all"] = names["train"] + names["test"]
        self.files = [os.path.join(folder, n) for n in names[split]]
        for path in self.files:
            if not os.path.isfile(path):
                raise DataError(f"--data_dir={root}: missing CIFAR-10 batch {path} (--dataset=cifar10 expects data_batch_1..5 and test_batch pickles)")
        self._lock = threading.Lock()
        self._images, self._labels = self._load()

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for path in self.files:
            try:
                with open(path, "rb") as f:
                    batch = pickle.load(f, encoding="bytes")
            except Exception as err:  # noqa: BLE001 - any unpickling failure is a format error
                raise DataError(f"{path}: not a CIFAR-10 python pickle ({type(err).__name__}: {err})") from None
            if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
                keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
                raise DataError(f"{path}: expected a dict with b'data' and b'labels', got {keys}")
            data = np.asarray(batch[b"data"])
            lab = np.asarray(batch[b"labels"]).reshape(-1)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise DataError(f"{path}: b'data' is {data.dtype} {data.shape}; expected uint8 (N, 3072)")
            if lab.shape[0] != data.shape[0] or (lab.size and (lab.min() < 0 or lab.max() > 9)):
                raise DataError(f"{path}: b'labels' must hold {data.shape[0]} class ids in 0..9")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(lab.astype(np.int32))
        return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_images"] = None  # each worker reloads instead of receiving 150 MB
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    def __getitem__(self, index: int) -> Example:
        if self._images is None:
            with self._lock:
                if self._images is None:
                    self._images, _ = self._load()
        index = int(index)
        return {"image": self._images[index], "label": self._labels[index]}


# -------------------------------------------------------------------------------- digits

DIGITS_SIZE = 16
DIGITS_TEST_EVERY = 5


def digits_split_indices(split: str, num_examples: int = 1797) -> np.ndarray:
    """Held-out split of the 1,797 digits: every 5th image (index % 5 == 4) is 'test'."""
    split = canonical_split(split)
    idx = np.arange(num_examples)
    if split == "all":
        return idx
    is_test = idx % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1
    return idx[is_test] if split == "test" else idx[~is_test]


def _resize_plane(plane: np.ndarray, size: int) -> np.ndarray:
    out = Image.fromarray(plane.astype(np.float32), mode="F").resize(
        (size, size), Image.Resampling.BILINEAR
    )
    return np.asarray(out, dtype=np.float32)


class DigitsSource:
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, values 0..16).

    Upsampled bilinearly to 16x16 in float, then scaled by 255/16 to uint8; one
    channel, 10 classes. Split: index % 5 == 4 -> 'test' (359 images), the rest
    'train' (1,438); 'all' gives every image. No download: the data ship inside
    scikit-learn. Flipping is disabled (a mirrored digit is a different glyph).
    """

    num_classes = 10
    channels = 1
    latent = False
    allow_flip = False
    image_shape = (DIGITS_SIZE, DIGITS_SIZE, 1)

    def __init__(self, split: str = "train"):
        try:
            from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
        except ImportError:
            raise DataError("--dataset=digits needs scikit-learn (pip install scikit-learn)") from None
        digits = load_digits()
        raw = np.asarray(digits.images, dtype=np.float32)  # (1797, 8, 8), 0..16
        idx = digits_split_indices(split, raw.shape[0])
        up = np.stack([_resize_plane(raw[i], DIGITS_SIZE) for i in idx])
        self._images = np.clip(np.round(up * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
        self._labels = np.asarray(digits.target, dtype=np.int32)[idx]

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    def __getitem__(self, index: int) -> Example:
        index = int(index)
        return {"image": self._images[index], "label": self._labels[index]}


# ------------------------------------------------------------------------------- latents


def _read_labels(path: str, num: int | None) -> np.ndarray:
    """A latents split's ``labels.npy``: 1-D, integer, 0-based, and ``num`` long when
    ``num`` is given (the split's latents.npy rows)."""
    try:
        lab = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable .npy array ({err})") from None
    if lab.ndim != 1 or (num is not None and lab.shape[0] != num) or not np.issubdtype(lab.dtype, np.integer):
        expected = "(N,)" if num is None else f"({num},) matching latents.npy"
        raise DataError(f"{path}: got {lab.dtype} {lab.shape}; expected integer {expected}")
    if lab.size and lab.min() < 0:
        raise DataError(f"{path}: negative label {lab.min()}; expected 0-based class ids")
    return lab


def _class_count(labels: np.ndarray) -> int:
    return int(labels.max()) + 1 if labels.size else 0


class LatentSource:
    """Precomputed latents: ``latents.npy`` (N, h, w, c) float, optional ``labels.npy`` (N,).

    Read from ``data_dir/<split>/`` (``val`` also serves as 'test'); a ``data_dir``
    without split folders is all training data and has no 'test' split, as for
    image folders. Memory-mapped. Without labels, ``num_classes`` is 0 and every label is 0.
    With labels in both splits, the held-out split's ``num_classes`` is train's (its
    labels must lie within it), as image folders number their classes.
    """

    latent = True
    allow_flip = True

    def __init__(self, data_dir: str, split: str = "train"):
        requested, split = split, canonical_split(split)
        root = _require_dir(data_dir, "latents", "latents.npy (N, h, w, c) float32 and optional labels.npy")
        if split == "all":
            _check_all_split(root, "latents")
        folder = root if split == "all" else _split_folder(root, requested, "latents", "latents.npy")
        self.path = os.path.join(folder, "latents.npy")
        if not os.path.isfile(self.path):
            raise DataError(f"--data_dir={root}: missing {self.path} (--dataset=latents expects latents.npy of shape (N, h, w, c) float32)")
        try:
            arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(f"{self.path}: not a readable .npy array ({err})") from None
        if arr.ndim != 4 or not np.issubdtype(arr.dtype, np.floating):
            raise DataError(f"{self.path}: got {arr.dtype} {arr.shape}; expected float (N, h, w, c)")
        if arr.shape[1] != arr.shape[2]:
            raise DataError(f"{self.path}: latents must be square, got (N, h, w, c) = {arr.shape} "
                            "(the models take square grids)")
        self.image_shape = tuple(int(d) for d in arr.shape[1:])
        self.channels = self.image_shape[-1]
        self._num = int(arr.shape[0])
        train_path = os.path.join(root, "train", "latents.npy")
        if split == "test" and os.path.isfile(train_path):
            # Latents are not resized: the model trained on train's grid takes only that.
            try:
                train_shape = tuple(int(d) for d in np.load(train_path, mmap_mode="r",
                                                             allow_pickle=False).shape[1:])
            except (OSError, ValueError) as err:
                raise DataError(f"{train_path}: not a readable .npy array ({err})") from None
            if train_shape != self.image_shape:
                raise DataError(f"{self.path}: latents of shape (h, w, c) = {self.image_shape}, but "
                                f"the training split's ({train_path}) are {train_shape}; "
                                "--dataset=latents needs both splits encoded alike")
        label_path = os.path.join(folder, "labels.npy")
        if os.path.isfile(label_path):
            lab = _read_labels(label_path, self._num)
            self._labels = lab.astype(np.int32)
            self.num_classes = _class_count(lab)
            train_labels = os.path.join(root, "train", "labels.npy")
            if split == "test" and os.path.isfile(train_labels):
                # As for image folders: the held-out split has train's classes, so its
                # num_classes does not depend on which classes its own examples cover.
                train = _class_count(_read_labels(train_labels, None))
                if self.num_classes > train:
                    raise DataError(f"{label_path}: label {self.num_classes - 1} is not a class of the "
                                    f"training split ({train_labels} has labels 0..{train - 1})")
                self.num_classes = train
        else:
            train_labels = os.path.join(root, "train", "labels.npy")
            if split == "test" and os.path.isfile(train_labels):
                # All-zero stand-in labels would score a probe against class 0 alone.
                raise DataError(f"--data_dir={root}: {label_path} is missing, but the training "
                                f"split has labels ({train_labels}); --dataset=latents needs the "
                                "held-out split's labels.npy too")
            self._labels = np.zeros((self._num,), np.int32)
            self.num_classes = 0
        self._array: np.ndarray | None = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_array"] = None
        return state

    def __len__(self) -> int:
        return self._num

    def __getitem__(self, index: int) -> Example:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        index = int(index)
        return {"image": np.asarray(self._array[index], dtype=np.float32), "label": self._labels[index]}


# ----------------------------------------------------------------------------- synthetic


class SyntheticSource:
    """Deterministic fake images for tests: smooth random patterns from (seed, index).

    Each image is a low-resolution random grid upsampled bilinearly (so there is
    spatial structure to learn), label = index % num_classes.
    """

    latent = False
    allow_flip = True

    def __init__(
        self,
        num_examples: int = 256,
        image_size: int = 16,
        channels: int = 3,
        num_classes: int = 10,
        seed: int = 0,
    ):
        if num_examples < 1 or image_size < 1 or channels < 1 or num_classes < 0:
            raise DataError(f"synthetic source: bad sizes num_examples={num_examples} image_size={image_size} channels={channels} num_classes={num_classes}")
        self.num_examples = num_examples
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.seed = seed
        self.image_shape = (image_size, image_size, channels)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> Example:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        coarse = rng.integers(0, 256, size=(4, 4, self.channels), dtype=np.uint8)
        planes = [
            np.asarray(
                Image.fromarray(coarse[..., c], mode="L").resize(
                    (self.image_size, self.image_size), Image.Resampling.BILINEAR
                ),
                dtype=np.uint8,
            )
            for c in range(self.channels)
        ]
        label = index % self.num_classes if self.num_classes else 0
        return {"image": np.stack(planes, axis=-1), "label": np.int32(label)}

