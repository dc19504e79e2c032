"""The jitted train step: a non-finite loss or gradient leaves the state untouched, and
a finite step updates exactly as optax's own clip + AdamW chain would.

A NaN batch must skip the optimizer update (params, both Adam moments and the EMA keep
their values bit for bit), advance the step, and count the skip; the next finite batch
updates as usual and resets the consecutive count.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unidiff import corruption as uc
from unidiff import models as um
from unidiff.train.optim import OptimConfig, make_optimizer
from unidiff.train.state import init_state
from unidiff.train.step import (
    StepConfig, check_model_fits_recipe, device_layout, drop_labels, make_mesh, make_train_step,
    replicate, shard_batch,
)


def _tree_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))


class _Tiny(NamedTuple):
    mesh: Any
    state: Any  # replicated TrainState
    step: Any  # the jitted train step
    batch: dict  # one host batch of uniform images


def _tiny_umd(model: um.Model, batch_size: int, ema_decay: float = 0.0) -> _Tiny:
    """A P/2 UMD train step on 8x8 RGB images, its initial state and one batch."""
    optimizer = make_optimizer(OptimConfig(base_lr=1e-2, batch_size=batch_size, total_steps=10,
                                           warmup_steps=0))
    mesh = make_mesh(1)
    state = replicate(init_state(model.init(jax.random.key(0)), optimizer, jax.random.key(1),
                                 use_ema=ema_decay > 0), mesh)
    step = make_train_step(model, uc.recipes.umd(), optimizer, mesh, batch_size,
                           StepConfig(patch_size=2, num_classes=0, ema_decay=ema_decay))
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (batch_size, 8, 8, 3)).astype(np.float32),
             "label": np.zeros(batch_size, np.int32)}
    return _Tiny(mesh, state, step, batch)


def test_nonfinite_step_is_skipped_and_counted():
    batch_size = 4
    mesh, state, step, good = _tiny_umd(um.Model(um.umd_config("P/2", image_size=8, in_channels=3)),
                                        batch_size, ema_decay=0.9)
    bad = dict(good, image=good["image"].copy())
    bad["image"][:, 3] = np.nan  # one NaN row of pixels in every image
    host = lambda s: jax.device_get(s)  # noqa: E731 - the step donates its input state

    before = host(state)
    for expected_run in (1, 2):
        state, metrics = step(state, shard_batch(bad, mesh, batch_size))
        after = host(state)
        assert not bool(metrics["finite"])
        assert int(after.step) == int(before.step) + expected_run
        assert int(after.nonfinite_run) == expected_run == int(after.nonfinite_total)
        for field in ("params", "opt_state", "ema_params"):
            assert _tree_equal(getattr(after, field), getattr(before, field)), field

    state, metrics = step(state, shard_batch(good, mesh, batch_size))
    after = host(state)
    assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
    assert int(after.nonfinite_run) == 0 and int(after.nonfinite_total) == 2
    assert not _tree_equal(after.params, before.params)
    assert not _tree_equal(after.ema_params, before.ema_params)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(after.params))


def test_step_update_equals_the_optax_reference_chain():
    """make_optimizer's clip reuses the step's gradient norm; the parameters after one
    (clipped) step equal those of the optax chain that computes the norm itself, passed
    as a plain GradientTransformation (no extra arguments, so the step must not pass
    ``grad_norm`` to it)."""
    import optax

    from unidiff.train.optim import decay_mask, lr_schedule

    cfg = um.umd_config("P/2", image_size=8, in_channels=3)
    model, batch_size = um.Model(cfg), 4
    opt_cfg = OptimConfig(base_lr=1e-2, batch_size=batch_size, total_steps=10, warmup_steps=0,
                          grad_clip=1e-3)  # far below the gradient norm: clipping is active
    chain = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip),
                        optax.adamw(lr_schedule(opt_cfg), b1=opt_cfg.b1, b2=opt_cfg.b2,
                                    weight_decay=opt_cfg.weight_decay, mask=decay_mask))
    plain = optax.GradientTransformation(chain.init, lambda u, s, p=None: chain.update(u, s, p))
    mesh = make_mesh(1)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (batch_size, 8, 8, 3)).astype(np.float32),
             "label": np.zeros(batch_size, np.int32)}
    params0 = jax.device_get(model.init(jax.random.key(0)))
    out = {}
    for name, optimizer in (("ours", make_optimizer(opt_cfg)), ("reference", plain)):
        state = replicate(init_state(jax.tree.map(jnp.asarray, params0), optimizer,
                                     jax.random.key(1), use_ema=False), mesh)
        step = make_train_step(model, uc.recipes.umd(), optimizer, mesh, batch_size,
                               StepConfig(patch_size=2, num_classes=0))
        state, metrics = step(state, shard_batch(batch, mesh, batch_size))
        assert float(metrics["grad_norm"]) > 100 * opt_cfg.grad_clip
        out[name] = jax.device_get(state.params)
    assert not _tree_equal(out["ours"], params0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 out["ours"], out["reference"])


def _traces(model, recipe, batch_size, image_size):
    """Whether the model and the UMD loss trace on ``recipe``'s branches (the oracle for
    ``check_model_fits_recipe``: the step's own loss, without the up-front check)."""
    cfg = model.config
    schedule = uc.make_schedule(recipe.schedule, recipe.num_steps)
    n_clean, _ = uc.split_batch(batch_size, recipe.r_t0, 1)

    def loss(params, images, keys):
        x0 = uc.patchify(images, cfg.patch_size)
        branches = uc.mix(recipe, schedule, keys, x0, None, num_clean=n_clean)
        preds = tuple(model.apply(params, b.x_t, b.t, b.labels, b.masking) for b in branches)
        return uc.umd_loss(recipe, schedule, branches, preds)[0]

    params = jax.eval_shape(model.init, jax.random.key(0))
    images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch_size))
    try:
        jax.eval_shape(loss, params, images, keys)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("arch", ["umd", "mdt", "dit"])
@pytest.mark.parametrize("recipe", ["umd", "umd_finetune", "mae", "dit", "maskdit", "mdt", "dit_half_clean"])
def test_model_recipe_check_rejects_what_cannot_train(arch, recipe):
    """``check_model_fits_recipe`` rejects the pairs whose loss cannot be traced (MDT's
    eps-only head on a clean branch, exact DiT on masked input) and the eps-only models
    under the eps + x0 noisy loss (whose x0 would be derived from eps), and nothing
    else; the step builder rejects them before tracing anything."""
    size, batch = 8, 20  # 20 rows: umd_finetune's r_t0 = 0.05 gets one clean row
    cfg = {"umd": lambda: um.umd_config("P/2", size, 3, num_classes=0),
           "mdt": lambda: um.mdt_config("P/2", size, 3, num_classes=0, si_position=-1),
           "dit": lambda: um.dit_config("P/2", size, 3, num_classes=0, output="x0_eps")}[arch]()
    # DiT's recipe with half its rows clean (t = 0, masked at m_t0).
    rec = (uc.recipes.dit(r_t0=0.5, m_t0=0.75) if recipe == "dit_half_clean"
           else uc.recipes.get(recipe))
    model = um.Model(cfg)
    traces = _traces(model, rec, batch, size)
    derives_x0 = cfg.output != "x0_eps" and rec.has_noisy and rec.noisy_loss == "eps_x0"
    try:
        check_model_fits_recipe(cfg, rec)
        accepted = True
    except ValueError as e:
        accepted = False
        assert rec.name in str(e)
    assert accepted == (traces and not derives_x0), (arch, recipe, traces, derives_x0)
    if not accepted:
        optimizer = make_optimizer(OptimConfig(batch_size=batch, total_steps=1, warmup_steps=0))
        with pytest.raises(ValueError, match=f"recipe {rec.name!r}"):
            make_train_step(model, rec, optimizer, make_mesh(1), batch,
                            StepConfig(patch_size=2, num_classes=0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drop_labels_nulls_clean_rows_and_drops_the_recipes_fraction(seed):
    """umd_finetune at batch 400: the 20 clean rows always see the null class; each
    noisy row independently with p = 0.1 (binomial: 38 of 380 expected, sd 5.8), and
    kept rows keep their label. The decision is a function of the row's key alone."""
    batch, null = 400, 10
    recipe = uc.recipes.umd_finetune()
    n_clean, _ = uc.split_batch(batch, recipe.r_t0, 1)
    keys = jax.random.split(jax.random.key(seed), batch)
    labels = jax.random.randint(jax.random.key(seed + 100), (batch,), 0, null)
    out = np.asarray(drop_labels(keys, labels, recipe.label_dropout, n_clean, null))
    assert n_clean == 20 and (out[:n_clean] == null).all()
    dropped = out[n_clean:] == null
    assert 38 - 4 * 5.8 < dropped.sum() < 38 + 4 * 5.8, dropped.sum()
    np.testing.assert_array_equal(out[n_clean:][~dropped], np.asarray(labels)[n_clean:][~dropped])
    # Rows reordered (as on another device layout) keep their own decisions.
    perm = np.random.default_rng(seed).permutation(batch - n_clean) + n_clean
    again = np.asarray(drop_labels(keys[perm], labels[perm], recipe.label_dropout, 0, null))
    np.testing.assert_array_equal(again, out[perm])
    # Without dropout only the clean rows change.
    np.testing.assert_array_equal(np.asarray(drop_labels(keys, labels, 0.0, n_clean, null))[n_clean:],
                                  np.asarray(labels)[n_clean:])


def test_ema_is_decay_times_old_ema_plus_one_minus_decay_times_new_params():
    """REFERENCE sec. 5-6: ema <- decay * ema + (1 - decay) * params, with the params
    after this step's update. Checked in numpy from the states before and after one
    finite step, starting from an EMA that differs from the params (an EMA equal to the
    params could not tell ema from params), at decay 0.9 (0.5 would be symmetric in the
    two). ``init_state`` starts the EMA as a copy of the params, and a non-finite step
    then leaves this (non-trivial) EMA unchanged."""
    cfg = um.umd_config("P/2", image_size=8, in_channels=3)
    model, batch_size, decay = um.Model(cfg), 4, 0.9
    # The optimizer, model and step of test_nonfinite_step_is_skipped_and_counted: one compile.
    optimizer = make_optimizer(OptimConfig(base_lr=1e-2, batch_size=batch_size, total_steps=10,
                                           warmup_steps=0))
    mesh = make_mesh(1)
    state = init_state(model.init(jax.random.key(0)), optimizer, jax.random.key(1), use_ema=True)
    assert _tree_equal(state.ema_params, state.params)
    assert init_state(state.params, optimizer, jax.random.key(1), use_ema=False).ema_params is None
    rng = np.random.default_rng(1)
    ema0 = jax.tree.map(lambda p: np.asarray(p) + rng.normal(0.0, 1.0, p.shape).astype(p.dtype),
                        jax.device_get(state.params))
    state = replicate(state._replace(ema_params=jax.tree.map(jnp.asarray, ema0)), mesh)
    step = make_train_step(model, uc.recipes.umd(), optimizer, mesh, batch_size,
                           StepConfig(patch_size=2, num_classes=0, ema_decay=decay))
    good = {"image": rng.uniform(-1, 1, (batch_size, 8, 8, 3)).astype(np.float32),
            "label": np.zeros(batch_size, np.int32)}
    params0 = jax.device_get(state.params)

    state, metrics = step(state, shard_batch(good, mesh, batch_size))
    after = jax.device_get(state)
    assert bool(metrics["finite"])
    assert not _tree_equal(after.params, params0)
    expected = jax.tree.map(lambda e, p: decay * np.float64(e) + (1 - decay) * np.float64(p),
                            ema0, after.params)
    got = jax.tree_util.tree_flatten_with_path(after.ema_params)[0]
    for (path, leaf), want in zip(got, jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(leaf, want, rtol=1e-6, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))

    bad = dict(good, image=np.full_like(good["image"], np.nan))
    state, metrics = step(state, shard_batch(bad, mesh, batch_size))
    assert not bool(metrics["finite"])
    assert _tree_equal(jax.device_get(state.ema_params), after.ema_params)
    assert _tree_equal(jax.device_get(state.params), after.params)


def test_logged_lr_is_the_rate_of_the_update_after_skipped_steps():
    """A skipped (non-finite) step leaves the optimizer state, and so its schedule's
    count, unchanged: the ``lr`` metric must be the schedule at that count (the rate the
    update really used), not at ``state.step``, which skipped steps do advance."""
    import optax

    from unidiff.train.optim import lr_schedule

    cfg = um.umd_config("P/2", image_size=8, in_channels=3)
    model, batch_size = um.Model(cfg), 4
    opt_cfg = OptimConfig(base_lr=1e-2, batch_size=batch_size, total_steps=10, warmup_steps=5)
    optimizer, lr_fn = make_optimizer(opt_cfg), lr_schedule(opt_cfg)
    mesh = make_mesh(1)
    state = replicate(init_state(model.init(jax.random.key(0)), optimizer, jax.random.key(1),
                                 use_ema=False), mesh)
    step = make_train_step(model, uc.recipes.umd(), optimizer, mesh, batch_size,
                           StepConfig(patch_size=2, num_classes=0), lr_fn=lr_fn)
    rng = np.random.default_rng(0)
    good = {"image": rng.uniform(-1, 1, (batch_size, 8, 8, 3)).astype(np.float32),
            "label": np.zeros(batch_size, np.int32)}
    bad = dict(good, image=np.full_like(good["image"], np.nan))
    for batch, finite in ((good, True), (bad, False), (bad, False), (good, True)):
        # optax's own step counts (scale_by_adam's and the schedule's), before this step.
        counts = {int(c) for _, c in optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")}
        assert len(counts) == 1
        (count,) = counts
        taken = int(state.step)
        state, metrics = step(state, shard_batch(batch, mesh, batch_size))
        assert bool(metrics["finite"]) == finite
        assert float(metrics["lr"]) == pytest.approx(float(lr_fn(count)), rel=1e-6, abs=0)
    # The last step came after two skips: its rate is the schedule at 1, not at 3.
    assert (count, taken) == (1, 3) and float(lr_fn(1)) != float(lr_fn(3))


@pytest.mark.parametrize("step_classes,model_classes,step_patch", [(0, 10, 2), (10, 0, 2), (5, 10, 2), (0, 0, 4)])
def test_step_config_must_agree_with_the_model(step_classes, model_classes, step_patch):
    """StepConfig repeats the model's patch size and class count. Disagreeing, the step
    used to run: a conditional model trained without labels, an unconditional one was
    handed labels it ignored, and with 5 against 10 classes label dropout replaced labels
    by class 5 (a real class of the model) instead of its null class 10."""
    model = um.Model(um.umd_config("P/2", image_size=8, in_channels=3, num_classes=model_classes))
    optimizer = make_optimizer(OptimConfig(batch_size=4, total_steps=1, warmup_steps=0))
    name = "patch_size" if step_patch != 2 else "num_classes"
    with pytest.raises(ValueError, match=f"StepConfig.{name}="):
        make_train_step(model, uc.recipes.dit(), optimizer, make_mesh(1), 4,
                        StepConfig(patch_size=step_patch, num_classes=step_classes))


@pytest.mark.parametrize("use_ema,decay", [(False, 0.9), (True, 0.0)])
def test_ema_setting_must_agree_with_the_state(use_ema, decay):
    """ema_decay > 0 with a state built without EMA parameters used to train with no EMA
    (ema_params stayed None); EMA parameters under ema_decay = 0 were overwritten with
    the parameters every step. Both are refused when the step is traced."""
    model = um.Model(um.umd_config("P/2", image_size=8, in_channels=3))
    optimizer = make_optimizer(OptimConfig(batch_size=4, total_steps=1, warmup_steps=0))
    mesh = make_mesh(1)
    state = replicate(init_state(model.init(jax.random.key(0)), optimizer, jax.random.key(1),
                                 use_ema=use_ema), mesh)
    step = make_train_step(model, uc.recipes.dit(), optimizer, mesh, 4,
                           StepConfig(patch_size=2, num_classes=0, ema_decay=decay))
    batch = {"image": np.zeros((4, 8, 8, 3), np.float32), "label": np.zeros(4, np.int32)}
    with pytest.raises(ValueError, match="ema_decay.*EMA parameters"):
        step(state, shard_batch(batch, mesh, 4))


def test_microbatched_step_updates_like_the_whole_batch():
    """``microbatches`` = 4 accumulates the gradient over four sequential chunks of 4
    rows: with class labels, label dropout (p = 0.5, so the chunks' own clean-row
    counts matter) and EMA, one AdamW step gives the loss, gradient norm, parameters,
    moments and EMA of the step over all 16 rows at once. The umd recipe's 8 clean rows
    split 2 per chunk, as they would over 4 devices."""
    cfg = um.umd_config("P/2", image_size=8, in_channels=3, num_classes=3)
    model, batch_size = um.Model(cfg), 16
    recipe = uc.recipes.umd(label_dropout=0.5)
    optimizer = make_optimizer(OptimConfig(base_lr=1e-2, batch_size=batch_size, total_steps=10,
                                           warmup_steps=0))
    mesh = make_mesh(1)
    rng = np.random.default_rng(3)
    batch = {"image": rng.uniform(-1, 1, (batch_size, 8, 8, 3)).astype(np.float32),
             "label": rng.integers(0, 3, batch_size).astype(np.int32)}
    params0 = jax.device_get(model.init(jax.random.key(0)))
    out = {}
    for m in (1, 4):
        state = replicate(init_state(jax.tree.map(jnp.asarray, params0), optimizer,
                                     jax.random.key(1), use_ema=True), mesh)
        step = make_train_step(model, recipe, optimizer, mesh, batch_size,
                               StepConfig(patch_size=2, num_classes=3, ema_decay=0.9, microbatches=m))
        state, metrics = step(state, shard_batch(batch, mesh, batch_size))
        out[m] = jax.device_get((state, metrics))
    (s1, m1), (s4, m4) = out[1], out[4]
    assert sorted(m1) == sorted(m4)
    for k in m1:
        np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert not _tree_equal(s1.params, params0)
    for field in ("params", "opt_state", "ema_params"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     getattr(s4, field), getattr(s1, field))


@pytest.mark.parametrize("microbatches,match", [
    (3, "not divisible by 1 devices x 3 microbatches"), (0, "microbatches must be an int >= 1"),
    (2.0, "microbatches must be an int >= 1"),
])
def test_microbatches_must_split_the_batch_evenly(microbatches, match):
    model = um.Model(um.umd_config("P/2", image_size=8, in_channels=3))
    optimizer = make_optimizer(OptimConfig(batch_size=4, total_steps=1, warmup_steps=0))
    with pytest.raises(ValueError, match=match):
        make_train_step(model, uc.recipes.umd(), optimizer, make_mesh(1), 4,
                        StepConfig(patch_size=2, num_classes=0, microbatches=microbatches))


def test_each_step_draws_its_own_randomness():
    """The step's t, noise, masks and label dropout come from the state's key folded with
    the step number: on the same parameters and batch, another step number gives another
    loss, the same step number the same loss. A key that ignored the step would draw the
    same corruption at every step, and no comparison of two runs with one seed (devices,
    resume, processes) could see it."""
    batch_size = 8
    mesh, state, step, batch = _tiny_umd(um.Model(um.umd_config("P/2", image_size=8, in_channels=3)),
                                         batch_size)
    start = jax.device_get(state)

    def losses_at(step_number):
        state = replicate(start._replace(step=np.asarray(step_number, start.step.dtype)), mesh)
        _, metrics = step(state, shard_batch(batch, mesh, batch_size))
        return float(metrics["loss_clean"]), float(metrics["loss_noisy"])

    first, again, later = losses_at(0), losses_at(0), losses_at(1)
    assert first == again
    assert first[0] != later[0] and first[1] != later[1]  # other masks; other t, noise, masks


@jax.custom_vjp
def _poison_gradient(x):
    return x


_poison_gradient.defvjp(lambda x: (x, None), lambda _, g: (jnp.full_like(g, jnp.inf),))


class _InfGradientModel(um.Model):
    """The real model, whose outputs pass an infinite cotangent back: a finite loss with
    a non-finite gradient."""

    def apply(self, *args, **kwargs):
        return jax.tree.map(_poison_gradient, super().apply(*args, **kwargs))


def test_a_non_finite_gradient_under_a_finite_loss_is_skipped():
    """The guard must look at the gradient norm as well as the loss: a finite loss
    (every case above has a NaN one) with an infinite gradient would otherwise update
    the parameters to inf."""
    batch_size = 4
    mesh, state, step, batch = _tiny_umd(
        _InfGradientModel(um.umd_config("P/2", image_size=8, in_channels=3)), batch_size)
    before = jax.device_get(state)
    state, metrics = step(state, shard_batch(batch, mesh, batch_size))
    after = jax.device_get(state)
    assert np.isfinite(float(metrics["loss"])) and not np.isfinite(float(metrics["grad_norm"]))
    assert not bool(metrics["finite"])
    assert int(after.nonfinite_total) == 1 == int(after.nonfinite_run)
    for field in ("params", "opt_state"):
        assert _tree_equal(getattr(after, field), getattr(before, field)), field


@settings(max_examples=60, deadline=None)
@given(devices=st.sampled_from([1, 2, 4, 8]), per_device=st.integers(1, 12), data=st.data())
def test_device_layout_gives_every_device_its_share_of_both_branches(devices, per_device, data):
    """The batch arrives with its clean rows first; device d must get the d-th run of
    n_clean / D clean rows, then the d-th run of the noisy rows, every row exactly once
    (a wrong offset repeated some rows and dropped others, seen only by the slow
    multi-device test)."""
    b = devices * per_device
    c = data.draw(st.integers(0, per_device)) * devices  # a clean count the devices divide
    perm = device_layout(b, c, devices)
    assert sorted(perm.tolist()) == list(range(b))
    blocks = perm.reshape(devices, per_device)
    clean, noisy = blocks[:, : c // devices], blocks[:, c // devices:]
    assert clean.ravel().tolist() == list(range(c))
    assert noisy.ravel().tolist() == list(range(c, b))
