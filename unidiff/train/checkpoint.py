"""Orbax checkpoints of the train state plus the Grain iterator state.

One ``CheckpointManager`` under ``workdir/checkpoints`` keeps the last N steps. Each
step stores the ``TrainState`` pytree (params, optimizer state, EMA, step, rng) and the
Grain iterator state (one JSON file per process, through Grain's orbax handler). Orbax writes a step into a temporary directory and renames
it when complete, so a process killed mid-save leaves the previous step loadable.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unidiff.outputs import atomic_write
from unidiff.train.state import TrainState


ITEMS = ("state", "data")


def checkpoint_dir(workdir: str) -> str:
    """Where a workdir keeps its checkpoints (absolute, as orbax wants it)."""
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


class CheckpointReadError(ValueError):
    """A checkpoint step exists but cannot be read (damaged files, another layout)."""


@contextlib.contextmanager
def _restoring(mngr: ocp.CheckpointManager, directory: str, step: int) -> Iterator[None]:
    """Turn orbax's and tensorstore's errors for an unreadable step (pages of nested
    specs) into one line that names the step and what to do."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
        first = (str(e).strip().splitlines() or [""])[0].split(" See full")[0][:200]
        others = sorted(s for s in mngr.all_steps() if s != step)
        fallback = (f"move that step's directory out of the way to use step {others[-1]}"
                    if others else "it is the only checkpoint")
        raise CheckpointReadError(
            f"{os.path.join(directory, str(step))}: cannot read this checkpoint "
            f"({type(e).__name__}: {first}). If the flags describe the run that wrote it, its "
            f"files are damaged: {fallback}"
        ) from e


def _item_handlers() -> dict[str, Any]:
    # Named handlers (not item_names) let the manager read a step's metadata.
    return {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}


@contextlib.contextmanager
def _reader(workdir: str, this_process_only: bool = False) -> Iterator[tuple[str, ocp.CheckpointManager]]:
    """(directory, manager) for reading a workdir's checkpoints; closed on exit, errors
    included. A manager syncs all processes of a multi-process run when it is made:
    ``this_process_only`` makes one that does not, for a process on its own."""
    directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(create=False)  # reading must not make the workdir
    if this_process_only:
        me = jax.process_index()
        options = ocp.CheckpointManagerOptions(
            create=False, multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}))
    mngr = ocp.CheckpointManager(directory, options=options, item_handlers=_item_handlers())
    try:
        yield directory, mngr
    finally:
        mngr.close()


class Checkpointer:
    """Save and restore (TrainState, Grain iterator) pairs in a workdir."""

    def __init__(self, workdir: str, max_to_keep: int = 3):
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_handlers=_item_handlers(),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_iter: Any, force: bool = False) -> bool:
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iter),
            ),
            force=force,
        )
        return bool(saved)

    def restore(self, abstract_state: TrainState, data_iter: Any, step: int | None = None) -> TrainState:
        """Restore the state and, in place, the position of ``data_iter``.

        ``abstract_state`` carries the shardings to restore to (those of this run's mesh):
        without them orbax restores to the mesh that saved, which fails where the
        processes or devices have changed since."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        with _restoring(self.manager, self.directory, step):
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=grain.checkpoint.CheckpointRestore(data_iter),
                ),
            )
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def latest_step(workdir: str, this_process_only: bool = False) -> int | None:
    """The newest complete checkpoint step under ``workdir/checkpoints``, or None.
    Called by every process of a multi-process run, unless ``this_process_only``."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        return None
    with _reader(workdir, this_process_only) as (_, mngr):
        return mngr.latest_step()


def saved_process_count(workdir: str, step: int) -> int | None:
    """How many processes wrote checkpoint ``step`` of ``workdir``: Grain saves one
    position per process (``data/process_<i>-of-<n>.json``). None where it cannot be told."""
    try:
        names = os.listdir(os.path.join(checkpoint_dir(workdir), str(step), "data"))
    except OSError:
        return None
    counts = {int(m.group(1)) for n in names if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", n))}
    return counts.pop() if len(counts) == 1 else None


def restore_params(workdir: str, use_ema: bool = True) -> tuple[Any, int]:
    """Load only the (EMA, if present and asked) parameters of a workdir's latest step.

    Used by the finetune, sample and probe binaries. Every array comes back whole on this
    process's first device, or, in a multi-process run, replicated on all devices (a
    global array, as the run's jitted initialisation takes it), whatever mesh and
    processes wrote it: restored as saved, a multi-process checkpoint asks for devices
    of processes that are not there.
    """
    with _reader(workdir) as (directory, mngr):
        step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"--workdir {workdir}: no checkpoint found under {directory}; run pretrain.py first"
            )
        if jax.process_count() > 1:
            here = NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), PartitionSpec())
        else:
            here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        with _restoring(mngr, directory, step):
            saved = mngr.item_metadata(step)["state"]
            template = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), saved)
            state = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(template)))["state"]
    # Restored without a template the NamedTuple comes back as a dict or list.
    fields = TrainState._fields
    if isinstance(state, (list, tuple)):
        state = dict(zip(fields, state))
    ema = state.get("ema_params")
    params = ema if (use_ema and ema) else state["params"]
    return jax.tree.map(lambda a: a, params), step


def merge_pretrained(fresh: Any, pretrained: Any) -> tuple[Any, list[str]]:
    """``fresh`` with every leaf whose path and shape match one of ``pretrained``'s
    replaced by that leaf (cast to the fresh dtype); the others (e.g. the label
    embedding a finetune adds) stay fresh. Returns ``(merged, paths of fresh leaves)``."""
    flat_pre = {jax.tree_util.keystr(p): v
                for p, v in jax.tree_util.tree_flatten_with_path(pretrained)[0]}
    new = []

    def pick(path, leaf):
        k = jax.tree_util.keystr(path)
        if k in flat_pre and tuple(flat_pre[k].shape) == tuple(leaf.shape):
            return jax.numpy.asarray(flat_pre[k], leaf.dtype)
        new.append(k)
        return leaf

    merged = jax.tree_util.tree_map_with_path(pick, fresh)
    return merged, new


def unused_pretrained(fresh: Any, pretrained: Any) -> list[str]:
    """Paths of ``pretrained``'s leaves that ``merge_pretrained`` would not copy into
    ``fresh`` (no leaf of that path and shape there): what a finetune drops, e.g. a
    label table under ``--noclass_conditional``."""
    flat_fresh = {jax.tree_util.keystr(p): tuple(v.shape)
                  for p, v in jax.tree_util.tree_flatten_with_path(fresh)[0]}
    return [k for p, v in jax.tree_util.tree_flatten_with_path(pretrained)[0]
            if flat_fresh.get(k := jax.tree_util.keystr(p)) != tuple(v.shape)]


def write_json_atomic(path: str, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
