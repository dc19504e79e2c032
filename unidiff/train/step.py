"""The sharded train step: ``jax.jit`` of a ``jax.shard_map`` over a 1-D ``data`` axis.

Parameters are replicated, the batch is sharded, gradients are averaged across the
axis, and the optimizer update runs on the replicated gradients. Every example draws
its randomness (t, noise, masking, label dropout) from its own key, split from the
step key, so a global batch gives the same loss on 1 or 8 devices: before sharding, the
batch is permuted so each device holds an equal share of the clean rows and of the
noisy rows (the canonical order is: the first ``n_clean`` rows are clean).

``StepConfig.microbatches`` = M > 1 accumulates each device's gradient over M
sequential chunks of its rows (a ``lax.scan``) before the one optimizer update: the same
update as M = 1 (the batch is laid out as if on D x M devices, so every chunk holds an
equal share of clean and noisy rows), with the activations of B / (D M) rows alive at a
time instead of B / D. Its only extra work is adding each chunk's gradients into the
accumulator; on CPU it is also faster, since small chunks keep their activations in
cache (exact DiT-S/4 at batch 32: 7-15% with M = 4 or 8; issue 6, README).

Shape glossary: B global batch, D devices, M microbatches, H/W/C image, L tokens,
P patch values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Int, PRNGKeyArray
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unidiff import corruption as uc
from unidiff.train.optim import global_norm
from unidiff.train.state import TrainState

DATA_AXIS = "data"
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# XLA:CPU turns optimization barriers into control dependencies before fusion, which
# would undo the barriers the models put on the residual-stream gradient at every block
# boundary (``unidiff.models.blocks.materialize_cotangent``); without them the backward
# pass of an unmasked 16-block model re-fuses the gradient chain into every consumer and
# runs 2.3x slower (issue 6). Only the CPU compile is changed.
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


@dataclasses.dataclass(frozen=True)
class StepConfig:
    patch_size: int
    num_classes: int  # 0 = unconditional; otherwise index num_classes is the null label
    ema_decay: float = 0.0  # 0 disables EMA
    compute_dtype: str = "float32"
    # Sequential chunks of each device's rows whose gradients are summed before the update.
    microbatches: int = 1


def make_mesh(num_devices: int | None = None) -> Mesh:
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices exist")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def device_layout(batch_size: int, n_clean: int, num_devices: int) -> np.ndarray:
    """Row permutation giving every device n_clean/D clean rows then its noisy rows."""
    b, c = batch_size // num_devices, n_clean // num_devices
    n = b - c
    perm = [
        np.concatenate([d * c + np.arange(c), n_clean + d * n + np.arange(n)])
        for d in range(num_devices)
    ]
    return np.concatenate(perm).astype(np.int32)


def check_model_fits_recipe(config: Any, recipe: uc.Recipe) -> None:
    """ValueError when ``recipe``'s loss needs a head or an input the model lacks.

    ``config`` is the model's ``ModelConfig``. Two kinds of term need the x0 head:
    the clean (t = 0) branch, where x_t = x0 leaves no noise to predict, and the x0
    term of the noisy loss ``eps_x0`` (UMD, DiT, MaskDiT; REFERENCE sec. 1 trains both
    heads). ``umd_loss`` could derive x0 from an eps-only head, but that x0's error is
    the eps error times sqrt((1 - alpha_bar_t) / alpha_bar_t), about 2e4 at t = T on
    the cosine schedule, so a few large-t rows would dominate every batch. Hiding
    tokens needs a mask token (or MDT's side-interpolater) to fill their slots. Without
    this check the first two surface only as a traceback or a diverging loss once the
    step runs.
    """
    if config.output != "x0_eps":
        if recipe.has_clean:
            raise ValueError(
                f"recipe {recipe.name!r} trains its clean (t = 0) branch (r_t0 = {recipe.r_t0}) "
                f"on an x0 prediction, but the model predicts {config.output!r} without an x0 "
                "head; use an architecture with x0 and eps heads (output 'x0_eps'), or r_t0 = 0"
            )
        if recipe.has_noisy and recipe.noisy_loss == "eps_x0":
            raise ValueError(
                f"the noisy loss of recipe {recipe.name!r}, 1/2 (eps MSE + x0 MSE), needs an x0 head, "
                f"but the model predicts {config.output!r}; an x0 derived from eps would "
                "multiply the eps error by up to 2e4 at large t. Use an architecture with x0 "
                "and eps heads (output 'x0_eps'), or the eps-only loss of the mdt recipe"
            )
    num_tokens = config.num_tokens
    hides = [k for k in recipe.keep_counts(num_tokens) if k is not None and k < num_tokens]
    if hides and not (config.mask_token or config.side_interpolater):
        raise ValueError(
            f"recipe {recipe.name!r} hides tokens (m_t0 = {recipe.m_t0}, m_t = {recipe.m_t}: "
            f"{min(hides)} of {num_tokens} visible), but the model has no mask token to fill "
            "the hidden slots (mask_token=False, as in exact DiT); use a masking architecture "
            "or mask ratios of 0"
        )


def check_microbatches(batch_size: int, r_t0: float, num_devices: int, microbatches: int) -> None:
    """ValueError unless ``microbatches`` chunks of every device's rows compute the same
    update as the whole batch: equal chunks, each with an equal share of the clean rows
    that the devices alone would get (``uc.split_batch``). Otherwise the chunks would
    round the recipe's clean fraction down further, e.g. umd_finetune's 12 clean rows of
    256 on 8 devices are 8, and over 8 x 2 chunks would be 0."""
    m = microbatches
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"microbatches must be an int >= 1, got {m!r}")
    if batch_size % (num_devices * m):
        raise ValueError(
            f"batch_size={batch_size} is not divisible by {num_devices} devices x {m} "
            "microbatches; every chunk needs the same number of rows")
    n_clean, _ = uc.split_batch(batch_size, r_t0, num_devices)
    if n_clean % (num_devices * m):
        raise ValueError(
            f"the {n_clean} clean (t = 0) rows of batch_size={batch_size} (r_t0 = {r_t0}) on "
            f"{num_devices} devices cannot be shared equally by {num_devices} x {m} "
            f"microbatches; use a microbatch count that divides {n_clean // num_devices}")


def drop_labels(
    keys: PRNGKeyArray, labels: Int[Array, "b"], label_dropout: float, num_clean: int, null: int
) -> Int[Array, "b"]:
    """Labels as the model sees them: the first ``num_clean`` rows (the clean branch)
    always get the ``null`` class, every other row independently with probability
    ``label_dropout`` (classifier-free guidance's dropout), decided by its own key so
    that a row's label does not depend on how the batch is split over devices."""
    # fold_in: a stream independent of the bits ``mix`` draws from the same row key.
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0x1AB)))(keys)
    drop = (u < label_dropout) | (jnp.arange(labels.shape[0]) < num_clean)
    return jnp.where(drop, null, labels)


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def make_train_step(
    model: Any,
    recipe: uc.Recipe,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    batch_size: int,
    cfg: StepConfig,
    lr_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Build ``train_step(state, batch) -> (state, metrics)``, jitted, donating the state.

    ``batch`` holds ``image`` (B, H, W, C) float32 in [-1, 1] and ``label`` (B,) int32,
    sharded along ``data`` (see :func:`shard_batch`). ``optimizer.update`` gets the
    gradients' global norm as the extra argument ``grad_norm`` (the clipping of
    :func:`unidiff.train.optim.make_optimizer` reuses it); a transformation without extra
    arguments is called as usual.

    ``lr_fn``, the optimizer's learning-rate schedule, adds the metric ``lr``: the rate of
    this step's update, indexed by the updates applied so far (skipped steps excluded).
    """
    check_model_fits_recipe(model.config, recipe)
    # StepConfig repeats two model settings; a mismatch would not fail but train wrongly:
    # the step feeds labels (and drops them to the null class num_classes) only when its
    # num_classes says so, so a conditional model would train unconditionally, or
    # dropped labels would land on a real class of a larger label table.
    for name in ("patch_size", "num_classes"):
        if getattr(cfg, name) != getattr(model.config, name):
            raise ValueError(
                f"StepConfig.{name}={getattr(cfg, name)!r} but the model's config has "
                f"{name}={getattr(model.config, name)!r}; they must agree"
            )
    optimizer = optax.with_extra_args_support(optimizer)
    num_devices = mesh.shape[DATA_AXIS]
    m = cfg.microbatches
    check_microbatches(batch_size, recipe.r_t0, num_devices, m)
    # Chunks are laid out like devices: each of the D x M gets n_clean / (D M) clean rows.
    n_clean, _ = uc.split_batch(batch_size, recipe.r_t0, num_devices * m)
    n_clean_local = n_clean // (num_devices * m)  # per chunk
    perm = device_layout(batch_size, n_clean, num_devices * m)
    identity = bool(np.all(perm == np.arange(batch_size)))
    schedule = uc.make_schedule(recipe.schedule, recipe.num_steps)
    dtype = COMPUTE_DTYPES[cfg.compute_dtype]
    conditional = cfg.num_classes > 0
    null = cfg.num_classes

    def local_loss(params, images, labels, keys):
        x0 = uc.patchify(images, cfg.patch_size)  # (b, L, P) float32
        if conditional:
            labels = drop_labels(keys, labels, recipe.label_dropout, n_clean_local, null)
        else:
            labels = None
        branches = uc.mix(recipe, schedule, keys, x0, labels, num_clean=n_clean_local)
        params_c = _cast(params, dtype)
        preds = []
        for b in branches:
            pred = model.apply(params_c, b.x_t.astype(dtype), b.t, b.labels, b.masking)
            preds.append(_cast(pred, jnp.float32))
        return uc.umd_loss(recipe, schedule, branches, tuple(preds))

    def local_grads(params, images, labels, keys):
        if num_devices > 1:
            # The parameters are replicated (invariant over the data axis). Differentiated
            # as such, shard_map's transpose already sums their gradients over the devices,
            # and the pmean below would then leave D times the mean. Cast to per-device
            # values, each device's gradient stays its own and the pmean averages them.
            params = jax.lax.pcast(params, DATA_AXIS, to="varying")
        grad_fn = jax.value_and_grad(local_loss, has_aux=True)
        if m == 1:
            (_, metrics), grads = grad_fn(params, images, labels, keys)
        else:
            grads, metrics = accumulate(grad_fn, params, (images, labels, keys))
        # Each device has the same clean/noisy split and the same masked-token counts,
        # so the mean of per-device masked means is the global masked mean.
        if num_devices > 1:
            # On one device the all-reduce is the identity, but XLA:CPU still runs it as a
            # copy of every gradient (1.6% of a DiT-S/4 batch-32 step; issue 6 profile).
            grads = jax.lax.pmean(grads, DATA_AXIS)
            metrics = jax.lax.pmean(metrics, DATA_AXIS)
        return grads, metrics

    def accumulate(grad_fn, params, rows):
        # (b, ...) -> (m, b / m, ...): chunk i is rows [i b/m, (i + 1) b/m), which the
        # layout above gave an equal share of clean and noisy rows.
        chunks = jax.tree.map(lambda a: a.reshape((m, a.shape[0] // m) + a.shape[1:]), rows)

        def body(total, chunk):
            (_, metrics), grads = grad_fn(params, *chunk)
            return jax.tree.map(jnp.add, total, grads), metrics

        # The gradients have the parameters' shapes and dtypes (float32); the metrics are
        # stacked as the scan's outputs, so no extra trace is needed for their structure.
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), params)
        if num_devices > 1:
            # The carry must vary over the data axis like the per-device sums it holds.
            zeros = jax.lax.pcast(zeros, DATA_AXIS, to="varying")
        total, metrics = jax.lax.scan(body, zeros, chunks)
        # Equal chunks with equal clean/noisy splits and masked-token counts: the mean of
        # the chunks' means is the mean over the device's rows (as across devices below).
        return jax.tree.map(lambda g: g / m, total), jax.tree.map(lambda x: x.mean(0), metrics)

    sharded_grads = jax.shard_map(
        local_grads,
        mesh=mesh,
        in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS)),
        out_specs=(P(), P()),
        # Replication over a one-device axis holds trivially; with no pmean there the
        # check cannot infer it.
        check_vma=num_devices > 1,
    )

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # At trace time: otherwise a state without EMA parameters under ema_decay > 0
        # would train without an EMA, and one with them under ema_decay = 0 would copy
        # the parameters into them, both silently.
        if (state.ema_params is not None) != (cfg.ema_decay > 0):
            raise ValueError(
                f"StepConfig.ema_decay={cfg.ema_decay} but the state "
                f"{'has' if state.ema_params is not None else 'has no'} EMA parameters; build "
                "the state with init_state(..., use_ema=ema_decay > 0)"
            )
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        keys = jax.random.split(key, batch_size)
        images, labels = batch["image"], batch["label"].astype(jnp.int32)
        if not identity:
            images, labels, keys = (jnp.take(a, perm, axis=0) for a in (images, labels, keys))
        grads, metrics = sharded_grads(state.params, images, labels, keys)

        grad_norm = global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

        def apply_update(operand):
            params, opt_state, ema, grads = operand
            updates, opt_state = optimizer.update(grads, opt_state, params, grad_norm=grad_norm)
            params = optax.apply_updates(params, updates)
            if ema is not None:
                d = cfg.ema_decay
                ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
            return params, opt_state, ema

        def skip_update(operand):
            params, opt_state, ema, _ = operand
            return params, opt_state, ema

        # A non-finite step keeps the old state. lax.cond rather than a jnp.where over
        # every leaf: that select pass over params, EMA and both Adam moments was 2% of a
        # DiT-S/4 step on CPU (profile, issue 6).
        params, opt_state, ema = jax.lax.cond(
            finite, apply_update, skip_update, (state.params, state.opt_state, state.ema_params, grads)
        )

        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=ema,
            rng=state.rng,
            nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        )
        metrics = dict(metrics, grad_norm=grad_norm, finite=finite)
        if lr_fn is not None:
            # The rate this step's update used: the optimizer's schedule counts applied
            # updates, and a skipped (non-finite) step leaves its count where it was, so
            # after k skips it lags ``state.step`` by k.
            metrics["lr"] = lr_fn(state.step - state.nonfinite_total)
        return new_state, metrics

    on_cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
    return jax.jit(train_step, donate_argnums=0, compiler_options=CPU_COMPILER_OPTIONS if on_cpu else None)


def shard_batch(batch: dict, mesh: Mesh, global_batch_size: int) -> dict:
    """Turn this process's numpy batch into global arrays sharded along ``data``."""
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    out = {}
    for name in ("image", "label"):
        local = np.asarray(batch[name])
        out[name] = jax.make_array_from_process_local_data(
            sharding, local, (global_batch_size,) + local.shape[1:]
        )
    return out


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device of ``mesh`` holds the whole array (parameters, optimizer state)."""
    return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))
