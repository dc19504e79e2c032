"""Grain input pipeline: shuffle, repeat, augment, shard by process, batch.

Order of operations (all but the last two on a ``grain.MapDataset``)::

    source -> shuffle(seed)          global permutation, reseeded each epoch
           -> repeat(num_epochs)     global stream position g = epoch * N + i
           -> map_with_index         decode + augment with rng(seed, g)
           -> block shard            this process's rows of every global batch
           -> to_iter_dataset (+ mp_prefetch workers)
           -> drop & count unreadable examples
           -> batch(batch_size // shard_count, drop_remainder=True)

``batch_size`` is the GLOBAL batch size. Global batch k is stream positions
[k*B, (k+1)*B); process p reads rows [p*B/P, (p+1)*B/P) of it and nothing else.
Because augmentation is keyed on g, the concatenation of the P local batches
(in process order) is bit-identical to the single-process batch, whatever the
number of processes or workers (as long as no file is unreadable: a skipped
example shifts that process's later rows).

The returned :class:`DataIterator` is a ``grain.DatasetIterator``: its
``get_state()`` is a small JSON-able dict, ``set_state`` restores it exactly, and
it can be handed straight to orbax with ``grain.checkpoint.CheckpointSave`` /
``CheckpointRestore``. The state also carries the count of skipped unreadable
images, exposed as ``DataIterator.num_skipped``.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np

from unidiff.data.errors import DataError
from unidiff.data.transforms import UNREADABLE, DEFAULT_CROP_AREA, ExampleTransform, check_crop_area

Batch = dict[str, np.ndarray]


class _MarkUnreadable:
    """Source adapter: an unreadable example (``None``) becomes a marker dict.

    Grain's map transforms pass ``None`` through untouched and ``to_iter_dataset``
    silently drops it, which would hide the failure; the marker instead reaches
    the transform, which flags it ``valid=False`` so it can be dropped AND counted.
    """

    def __init__(self, source: Any):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        element = self.source[index]
        return UNREADABLE if element is None else element


class _BlockShardMapDataset(grain.MapDataset):
    """This process's contiguous block of each global batch of the parent stream.

    Incomplete trailing global batches are dropped here, so every process
    yields the same number of batches (a collective step count).
    """

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, global_batch: int, shard_index: int, shard_count: int):
        super().__init__(parent)
        self._global = global_batch
        self._local = global_batch // shard_count
        self._offset = shard_index * self._local
        self._length = (len(parent) // global_batch) * self._local

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, index: int) -> int:
        step, row = divmod(int(index), self._local)
        return step * self._global + self._offset + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def _getitems(self, indices: Sequence[int]):
        return self._parent._getitems([self._parent_index(i) for i in indices])  # pylint: disable=protected-access

    def __str__(self) -> str:
        return f"BlockShardMapDataset(global={self._global}, local={self._local}, offset={self._offset})"


class _DropUnreadableIterator(grain.DatasetIterator):
    """Drops examples marked ``valid=False`` and counts them (count is part of the state).

    More than ``max_consecutive`` unreadable examples in a row (a whole epoch's worth)
    mean nothing readable is left: a DataError then, where the repeating stream would
    otherwise skip forever and never yield a batch.
    """

    def __init__(self, parent: grain.DatasetIterator, max_consecutive: int):
        super().__init__(parent)
        self.num_skipped = 0
        self._max_consecutive = max_consecutive

    def __next__(self) -> dict[str, Any]:
        run = 0
        while True:
            element = next(self._parent)
            if bool(element["valid"]):
                return {"image": element["image"], "label": element["label"]}
            self.num_skipped += 1
            run += 1
            if run > self._max_consecutive:
                raise DataError(f"{run} unreadable examples in a row, more than the "
                                f"{self._max_consecutive} of a whole epoch: no example of "
                                "this dataset can be read any more (see the warnings above "
                                "for their paths)")

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "num_skipped": int(self.num_skipped)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.num_skipped = int(state["num_skipped"])

    def __str__(self) -> str:
        return "DropUnreadableIterator"


class _DropUnreadableIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, max_consecutive: int):
        super().__init__(parent)
        self._max_consecutive = max_consecutive

    def __iter__(self) -> _DropUnreadableIterator:
        return _DropUnreadableIterator(self._parent.__iter__(), self._max_consecutive)

    def __str__(self) -> str:
        return "DropUnreadableIterDataset"


class DataIterator(grain.DatasetIterator):
    """Iterator over local batches ``{"image": float32 (b,H,W,C), "label": int32 (b,)}``.

    ``get_state()`` / ``set_state()`` round-trip exactly; ``num_skipped`` is the
    running count of unreadable images dropped by this process (restored with
    the state). ``local_batch_size`` = global batch // number of processes.
    """

    def __init__(self, parent: grain.DatasetIterator, drop: _DropUnreadableIterator, local_batch_size: int):
        super().__init__(parent)
        self._drop = drop
        self.local_batch_size = local_batch_size

    @property
    def num_skipped(self) -> int:
        return int(self._drop.num_skipped)

    def __next__(self) -> Batch:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)

    def __str__(self) -> str:
        return "unidiff.DataIterator"


def _stack(elements: Sequence[dict[str, Any]]) -> Batch:
    return {
        "image": np.stack([e["image"] for e in elements]).astype(np.float32, copy=False),
        "label": np.asarray([e["label"] for e in elements], dtype=np.int32),
    }


# How the shuffle's seed derives from --seed. Grain reseeds each epoch's permutation with
# (shuffle seed + epoch), so with the seed itself (the first scheme) seeds s and s + 1
# shared their epoch orders shifted by one, and replicate runs were less independent
# than they looked; hashing the seed first gives every seed its own sequence. Runs begun
# with the first scheme keep it on resume (their saved position indexes its order).
DATA_ORDERS = ("hashed_seed", "seed_plus_epoch")


def shuffle_seed(seed: int, order: str = "hashed_seed") -> int:
    """The 32-bit seed given to Grain's shuffle for ``--seed`` under ``order``."""
    if order not in DATA_ORDERS:
        raise DataError(f"data order {order!r}: expected one of {', '.join(DATA_ORDERS)}")
    if order == "seed_plus_epoch":
        return int(seed) % 2**32
    return int(np.random.SeedSequence([int(seed), 0x5EED0]).generate_state(1, np.uint32)[0])


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full global batches in one epoch (the loader's stream does not restart per epoch)."""
    return num_examples // batch_size


def _resolve_image_size(source: Any, image_size: int | None) -> int:
    shape = getattr(source, "image_shape", None)
    latent = bool(getattr(source, "latent", False))
    if latent:
        if shape is None or shape[0] != shape[1]:
            raise DataError(f"latents must be square (h == w), got shape {shape}")
        if image_size is not None and image_size != shape[0]:
            raise DataError(f"--image_size={image_size}: latents are {shape[0]}x{shape[1]}; latents are not resized (set --image_size={shape[0]} or leave it unset)")
        return int(shape[0])
    if image_size is None:
        if shape is None:
            raise DataError("--image_size must be set: images in this dataset vary in size")
        return int(shape[0])
    if not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise DataError(f"--image_size={image_size!r}: expected a positive integer")
    return int(image_size)


def make_loader(
    source: Any,
    *,
    batch_size: int,
    seed: int,
    train: bool = True,
    image_size: int | None = None,
    crop_area: tuple[float, float] = DEFAULT_CROP_AREA,
    flip: bool = True,
    num_workers: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    read_threads: int = 4,
    order: str = "hashed_seed",
) -> DataIterator:
    """Builds this process's batch iterator over ``source``.

    Args:
      source: any source from :mod:`unidiff.data.sources` (or duck-typed alike).
      batch_size: GLOBAL batch size; must be divisible by ``shard_count``.
      seed: shuffle order and augmentation both derive from it.
      train: True -> global shuffle (new order every epoch), random resized crop
        and flip; False -> source order, centre crop + resize.
      image_size: output side; None = the source's native size.
      crop_area: area fraction range of the random resized crop.
      flip: random horizontal flip in training; ignored (off) for sources with
        ``allow_flip = False`` such as digits.
      num_workers: Grain worker processes (``mp_prefetch``); 0 = in-process.
      shard_index / shard_count: default ``jax.process_index()`` / ``jax.process_count()``.
      num_epochs: None = repeat forever; otherwise stop after that many epochs
        (the trailing incomplete global batch is dropped).
      read_threads: threads per process reading/decoding examples.
      order: how the shuffle seed derives from ``seed`` (``DATA_ORDERS``; see
        ``shuffle_seed``): ``hashed_seed``, or ``seed_plus_epoch`` to resume a run
        begun before it.
    """
    if shard_index is None or shard_count is None:
        import jax  # pylint: disable=import-outside-toplevel

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"--batch_size={batch_size!r}: expected a positive integer")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"--seed={seed!r}: expected a non-negative integer")
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index={shard_index} shard_count={shard_count}: expected 0 <= index < count")
    if batch_size % shard_count:
        raise DataError(f"--batch_size={batch_size} must be divisible by the number of processes ({shard_count})")
    if num_workers < 0:
        raise DataError(f"--num_workers={num_workers}: expected >= 0")
    shuffle_seed(seed, order)  # an unknown order fails here, before any work
    if num_epochs is not None and num_epochs < 1:
        raise DataError(f"num_epochs={num_epochs}: expected None (forever) or >= 1")
    check_crop_area(crop_area)
    n = len(source)
    if n == 0:
        raise DataError("the dataset split has no examples (check --dataset / --data_dir)")
    if num_epochs is not None and n * num_epochs < batch_size:
        raise DataError(f"--batch_size={batch_size} exceeds the {n * num_epochs} examples in {num_epochs} epoch(s)")
    size = _resolve_image_size(source, image_size)
    latent = bool(getattr(source, "latent", False))
    channels = int(source.image_shape[-1]) if latent else int(source.channels)

    transform = ExampleTransform(
        seed=int(seed),
        train=bool(train),
        image_size=size,
        channels=channels,
        crop_area=(float(crop_area[0]), float(crop_area[1])),
        flip=bool(flip) and bool(getattr(source, "allow_flip", True)),
        latent=latent,
    )
    local = batch_size // shard_count

    ds = grain.MapDataset.source(_MarkUnreadable(source))
    if train:
        # Grain's shuffle reseeds with (seed + epoch) for positions past len(ds),
        # so repeat() after shuffle() gives a fresh permutation every epoch.
        ds = ds.shuffle(seed=shuffle_seed(seed, order))
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(transform)
    ds = _BlockShardMapDataset(ds, batch_size, int(shard_index), int(shard_count))

    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * local, 16))
    )
    if num_workers > 0:
        _ensure_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    it_ds = _DropUnreadableIterDataset(it_ds, n).batch(local, drop_remainder=True, batch_fn=_stack)
    batch_it = iter(it_ds)
    return DataIterator(batch_it, _find_drop_iterator(batch_it), local)


def _ensure_flags_parsed() -> None:
    """Grain's worker processes read absl flags (all defaults unless the binary set them).

    A binary run under ``absl.app.run`` has parsed them already; a notebook or
    test has not, and Grain would fail inside the worker, so fall back to defaults.
    """
    from absl import flags  # pylint: disable=import-outside-toplevel

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _find_drop_iterator(it: grain.DatasetIterator) -> _DropUnreadableIterator:
    todo = [it]
    while todo:
        node = todo.pop()
        if isinstance(node, _DropUnreadableIterator):
            return node
        todo.extend(node._parents)  # pylint: disable=protected-access
    raise AssertionError("pipeline lost its unreadable-image counter")
