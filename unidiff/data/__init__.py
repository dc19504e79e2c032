"""Grain data sources, per-example transforms and the sharded, checkpointable loader.

Typical use::

    from unidiff import data as ud
    info = ud.validate_data(FLAGS.dataset, FLAGS.data_dir, "train")   # before compiling
    source = ud.build_source(FLAGS.dataset, FLAGS.data_dir, "train")
    it = ud.make_loader(source, batch_size=FLAGS.batch_size, seed=FLAGS.seed,
                        image_size=FLAGS.image_size, num_workers=FLAGS.num_workers)
    batch = next(it)            # {"image": float32 (b,H,W,C) in [-1,1], "label": int32 (b,)}
    state = it.get_state()      # JSON-able; it.set_state(state) resumes exactly
    it.num_skipped              # unreadable images dropped so far on this process
"""

from unidiff.data.errors import DataError
from unidiff.data.loader import DATA_ORDERS, DataIterator, make_loader, shuffle_seed, steps_per_epoch
from unidiff.data.registry import (
    DATASETS,
    DatasetInfo,
    build_source,
    dataset_info,
    source_info,
    splits_share_examples,
    validate_data,
)
from unidiff.data.sources import (
    Cifar10Source,
    DigitsSource,
    ImageFolderSource,
    ImageNetNpzSource,
    LatentSource,
    SyntheticSource,
    canonical_split,
    digits_split_indices,
    readable_examples,
    subset_order,
)
from unidiff.data.transforms import (
    center_crop_box,
    crop_and_resize,
    eval_image,
    sample_crop_box,
    to_unit_range,
    train_image,
)

__all__ = [
    "DATASETS",
    "Cifar10Source",
    "DataError",
    "DATA_ORDERS",
    "DataIterator",
    "DatasetInfo",
    "DigitsSource",
    "ImageFolderSource",
    "ImageNetNpzSource",
    "LatentSource",
    "SyntheticSource",
    "build_source",
    "canonical_split",
    "center_crop_box",
    "crop_and_resize",
    "dataset_info",
    "digits_split_indices",
    "eval_image",
    "make_loader",
    "shuffle_seed",
    "readable_examples",
    "sample_crop_box",
    "source_info",
    "splits_share_examples",
    "steps_per_epoch",
    "subset_order",
    "to_unit_range",
    "train_image",
    "validate_data",
]
