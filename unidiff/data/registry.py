"""Dataset names -> sources, plus up-front validation and cheap metadata.

``validate_data`` is meant to run before anything compiles: it builds the source
(which checks every file it will read, without decoding images) and returns its
:class:`DatasetInfo`, raising :class:`DataError` with a one-line message naming
``--dataset`` / ``--data_dir`` or the offending file.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from unidiff.data import sources as S
from unidiff.data.errors import DataError

DATASETS = ("imagenet64", "imagenet32", "folder", "cifar10", "digits", "latents", "synthetic")


class DatasetInfo(NamedTuple):
    image_size: int | None  # native side length; None when images vary (folder)
    channels: int
    num_classes: int  # 0 = unlabeled
    num_examples: int


def build_source(name: str, data_dir: str | None = None, split: str = "train") -> Any:
    """Returns the random-access source for ``--dataset=name`` (validated)."""
    # Folder and latents get the name as asked ('val' reads val/ where test/ exists too);
    # the others know one held-out split.
    asked, split = split, S.canonical_split(split)
    if name == "imagenet64":
        return S.ImageNetNpzSource(data_dir, split, image_size=64, dataset=name)
    if name == "imagenet32":
        return S.ImageNetNpzSource(data_dir, split, image_size=32, dataset=name)
    if name == "folder":
        return S.ImageFolderSource(data_dir, asked)
    if name == "cifar10":
        return S.Cifar10Source(data_dir, split)
    if name == "digits":
        return S.DigitsSource(split)
    if name == "latents":
        return S.LatentSource(data_dir, asked)
    if name == "synthetic":
        # Disjoint streams for train and test; 'all' is the train stream.
        return S.SyntheticSource(num_examples=256 if split != "test" else 64, seed=0 if split != "test" else 1)
    raise DataError(f"--dataset={name!r}: expected one of {', '.join(DATASETS)}")


def splits_share_examples(name: str, split_a: str, source_a: Any, split_b: str,
                          source_b: Any) -> bool:
    """Whether two built splits of ``--dataset=name`` can hold the same examples.

    'all' holds every split. Names of one canonical split ('test', 'val') are the same
    examples, except for folder and latents trees with both a test/ and a val/ folder,
    where each name reads its own folder (see ``sources._split_folder``).
    """
    a, b = S.canonical_split(split_a), S.canonical_split(split_b)
    if "all" in (a, b):
        return True
    if a != b:
        return False
    if name == "folder":
        return os.path.realpath(source_a.root) == os.path.realpath(source_b.root)
    if name == "latents":
        return os.path.realpath(source_a.path) == os.path.realpath(source_b.path)
    return True


def source_info(source: Any) -> DatasetInfo:
    shape = getattr(source, "image_shape", None)
    return DatasetInfo(
        image_size=None if shape is None else int(shape[0]),
        channels=int(source.channels),
        num_classes=int(source.num_classes),
        num_examples=len(source),
    )


def validate_data(name: str, data_dir: str | None = None, split: str = "train") -> DatasetInfo:
    """Checks ``--dataset`` / ``--data_dir`` before any compile; raises DataError."""
    source = build_source(name, data_dir, split)
    info = source_info(source)
    if info.num_examples == 0:
        raise DataError(f"--dataset={name} --data_dir={data_dir}: split '{split}' has no examples")
    if isinstance(source, S.ImageFolderSource):
        _check_some_decode(source, data_dir, split)
    return info


def _check_some_decode(source: Any, data_dir: str | None, split: str, tries: int = 16) -> None:
    """A folder is only listed when it is opened; if none of a seeded sample of its files
    decodes (git-lfs pointers, saved HTML pages), most of it is unreadable, and training
    would skip its way through a whole epoch before finding out. One decodable file in
    the sample is enough: the loader skips and counts the others."""
    picks = S.subset_order(len(source), tries, seed=0)[:tries]
    if all(source[int(i)] is None for i in picks):
        raise DataError(f"--data_dir={data_dir}: none of {len(picks)} sampled images of split "
                        f"'{split}' could be decoded, e.g. {source.paths[int(picks[0])]} (git-lfs "
                        "pointers or saved web pages?); --dataset=folder needs .jpg/.jpeg/.png "
                        "files that Pillow reads")


def dataset_info(name: str, data_dir: str | None = None, split: str = "train") -> DatasetInfo:
    """(image_size, channels, num_classes, num_examples) of a dataset split.

    Cheap for every source except CIFAR-10 (reads its ~180 MB of pickles) and
    digits (a fraction of a second): npz files only have their headers and
    labels read, folders are listed but not decoded, latents are memory-mapped.
    """
    return validate_data(name, data_dir, split)
