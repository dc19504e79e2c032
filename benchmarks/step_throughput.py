"""Throughput of the real training step for every recipe: step time, images/s, FLOPs, MFU.

For each recipe this builds exactly what ``experiments/pretrain.py`` trains (the same
architecture mapping, ``unidiff.train.loop.model_config_for``; the same optimizer; the
jitted, sharded ``unidiff.train.step.make_train_step``), compiles it ahead of time on a
synthetic batch, and measures:

  * compile time: tracing and lowering plus XLA's compilation of the train step (also
    recorded apart, ``lower_time_s`` and ``xla_compile_time_s``). Interleaved, the
    next recipe is lowered while the previous one compiles (``prepare_recipes``), so
    these are times under that overlap;
  * steady-state step time: the median over ``--steps`` steps after ``--warmup_steps``
    warm-up steps, each step timed on its own and blocked on (new state, metrics). By
    default every recipe is compiled first and the steps are then taken in turns (dit,
    maskdit, mae, umd, mdt, dit, ...), so a slow spell of a shared host slows every
    recipe's steps alike instead of one recipe's median; ``--nointerleave`` times one
    recipe after another and holds only one recipe's state at a time;
  * images/s = batch / step time; FLOPs per step from the analytic model
    (``unidiff.flops``: forward + backward = 3 x forward, real token counts per
    branch); achieved FLOP/s = FLOPs / step time;
  * MFU = achieved FLOP/s / (peak x devices), where the peak is one device's: a large
    square matmul in the compute dtype on device 0, timed between the steps (once per
    round of recipes, or once after each step with ``--nointerleave``; the median is
    used), so that it sees the same spells of the shared host as the steps, unless
    ``--peak_flops`` is given; it is
    also measured before and after the recipes, and all three are in the JSON.
    Simulated host devices (``--xla_force_host_platform_device_count``) share the
    same cores, so there the machine's matmul rate is the peak of all of them
    together: pass it divided by the device count as ``--peak_flops``;
  * peak memory from ``device.memory_stats()`` where the backend reports it (GPU/TPU;
    the CPU backend reports nothing, so it is None there; a high-water mark of the whole
    run, so with interleaving it covers all recipes' states at once), plus XLA's own estimate of
    the step's temporary buffers (``compiled.memory_analysis()``);
  * XLA's own FLOP count of the compiled step (``compiled.cost_analysis()``, all
    devices), logged as a multiple of the FLOP model: near 1 means the step does no
    work the model leaves out (computing on hidden tokens, recomputing blocks).

The table also shows each recipe's step time relative to DiT's (measured in the same
run) next to the FLOP model's prediction of that ratio.

Presets (individual flags override them; a preset's batch is per device, so the global
batch is that times the device count, while ``--batch_size`` gives the global batch):
  * ``cpu``: S/4 at 64x64, batch 4, float32, 10 timed steps after 1 warm-up step: 2 min
    11 s to 2 min 57 s for the five recipes on 2 CPU cores (twenty-two runs on 2026-12-07
    that compiled their programs), about 1 minute of it compiling five 16-block models;
    1 min 34 s to 1 min 57 s (three runs) when ``--compilation_cache_dir`` holds the
    programs from an earlier run; about 6 GiB of memory, with all five states held for
    the interleaved steps.
    64x64 keeps the paper's 256 tokens, so the recipes' token ratios are those of the
    paper's B/4 at 64x64; their FLOP ratios are 0.007-0.009 lower (UMD 0.568 against
    0.576), attention being a larger share of the work at S/4's width. Batch 4 halves batch
    8's stepping time and is where the DiT recipe runs best (its activations stay in
    the L3 cache); at batch 6 UMD's and MAE's ratios to DiT came out 0.03-0.06 lower,
    a third or more of that from DiT slowing down (benchmarks/README.md, "Suite size").
  * ``paper``: B/4 at 64x64, batch 256 per device, bfloat16 (a GPU or TPU).

``--compilation_cache_dir=DIR`` (JAX's persistent compilation cache) loads the programs
an earlier run compiled into DIR: the same executables, so the same step times, but then
``compile_time_s`` is tracing, lowering and loading, and the record's
``compile_cache_hit`` is true (also when the cache was set up through
``JAX_COMPILATION_CACHE_DIR``).

``--microbatches=M`` times the step that accumulates the gradient over M sequential
chunks of each device's rows (pretrain.py's flag of that name): the same update and FLOPs.
On this project's 2-core CPU, exact DiT-S/4 at batch 32 ran 7-15% faster with M = 4 or 8
(chunks of 8 or 4 rows, whose activations stay in the 32 MiB L3 cache) than with M = 1.

Example::

    python benchmarks/step_throughput.py --preset=cpu --json=/tmp/cpu.json
    python benchmarks/step_throughput.py --model=S/4 --image_size=64 --batch_size=32 --recipes=dit
    python benchmarks/step_throughput.py --model=S/4 --image_size=64 --batch_size=32 --recipes=dit \
        --arch=dit --microbatches=8
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
import threading
import time
from typing import Any

from absl import app, flags

from unidiff.outputs import atomic_write, check_output_file
from unidiff.runtime import (
    define_compilation_cache_flag, quiet_backend_probe, tune_host_allocator, use_compilation_cache,
)

# Before jax starts its thread pools (unidiff/runtime.py says why).
tune_host_allocator()
quiet_backend_probe()

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(recipes="dit,maskdit,mae,umd,mdt", model="S/4", image_size=64, batch_per_device=4,
                steps=10, warmup_steps=1, compute_dtype="float32", matmul_size=2048),
    "paper": dict(recipes="dit,maskdit,mae,umd,mdt", model="B/4", image_size=64, batch_per_device=256,
                  steps=20, warmup_steps=2, compute_dtype="bfloat16", matmul_size=8192),
}
RECIPE_CHOICES = ("dit", "maskdit", "mae", "umd", "mdt", "umd_finetune", "usp")

_PRESET = flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Base configuration; other flags override it.")
_RECIPES = flags.DEFINE_string("recipes", None, f"Comma list of recipes from {', '.join(RECIPE_CHOICES)}.")
_MODEL = flags.DEFINE_string("model", None, "Model variant, e.g. S/4 or B/4.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Square image size in pixels.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global batch size (default: the preset's batch "
                                   "per device times the number of devices).")
_STEPS = flags.DEFINE_integer("steps", None, "Timed steps per recipe (median reported; >= 10 for real numbers).")
_WARMUP = flags.DEFINE_integer("warmup_steps", None, "Untimed steps after compilation (default: the preset's).")
_DTYPE = flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16"], "Compute dtype of the step.")
_PEAK = flags.DEFINE_float("peak_flops", None, "Peak FLOP/s of one device for MFU (the step runs on all "
                           "devices, so MFU divides by this times their number); default: measured "
                           "with a matmul on one device.")
_MATMUL = flags.DEFINE_integer("matmul_size", None, "Side of the square matmul measuring the peak.")
_ARCH = flags.DEFINE_enum("arch", "auto", ["auto", "umd", "umd_no_adaln", "mae", "mdt", "maskdit", "dit",
                                           "dit_affine"],
                          "Architecture as in training (--arch of pretrain.py); auto = the recipe's default. "
                          "'dit' = exactly DiT (all blocks on all tokens, no CLS).")
_SI_POSITION = flags.DEFINE_integer(
    "si_position", None, "MDT's side-interpolater before this block, for the recipes that "
    "train the mdt architecture (as pretrain.py's --si_position); unset = -2.")
_MICROBATCHES = flags.DEFINE_integer(
    "microbatches", 1, "Accumulate each step's gradient over this many sequential chunks of every "
    "device's rows (pretrain.py's --microbatches): the same update, less memory, and on CPU "
    "faster at large batches (e.g. 8 for batch 32).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 0, "Class-conditional with this many classes (0 = none).")
_INTERLEAVE = flags.DEFINE_bool(
    "interleave", True, "Time the recipes' steps in turns (dit, maskdit, ..., dit, ...) after compiling "
    "them all, so a slow spell of a shared host hits every recipe alike; --nointerleave runs one "
    "recipe after another and holds one recipe's state at a time.")
_JSON = flags.DEFINE_string("json", None, "Write the records as a JSON list to this path.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the parameters and the synthetic batch.")
_COMPILATION_CACHE = define_compilation_cache_flag()

# JAX records this event in the thread that loads a program from the persistent cache.
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


@dataclasses.dataclass(frozen=True)
class Options:
    recipes: tuple[str, ...]
    model: str
    image_size: int
    batch_size: int
    steps: int
    warmup_steps: int = 2
    compute_dtype: str = "float32"
    peak_flops: float | None = None
    matmul_size: int = 2048
    arch: str = "auto"
    si_position: int | None = None
    num_classes: int = 0
    seed: int = 0
    channels: int = 3
    interleave: bool = True
    microbatches: int = 1

    def validate(self) -> None:
        def fail(flag: str, msg: str) -> None:
            raise ValueError(f"--{flag}: {msg} (got {getattr(self, flag)!r})")

        if not self.recipes:
            fail("recipes", "need at least one recipe")
        bad = [r for r in self.recipes if r not in RECIPE_CHOICES]
        if bad:
            fail("recipes", f"unknown recipe(s) {bad}; expected from {', '.join(RECIPE_CHOICES)}")
        if len(set(self.recipes)) != len(self.recipes):
            fail("recipes", "lists a recipe twice")
        for f, lo in (("image_size", 1), ("batch_size", 1), ("steps", 1), ("warmup_steps", 0),
                      ("matmul_size", 1), ("num_classes", 0), ("microbatches", 1)):
            if getattr(self, f) < lo:
                fail(f, f"must be >= {lo}")
        if self.peak_flops is not None and not (math.isfinite(self.peak_flops) and self.peak_flops > 0):
            fail("peak_flops", f"must be a finite number > 0, got {self.peak_flops}")
        if self.si_position is not None and not any(self.arch_of(r) == "mdt" for r in self.recipes):
            fail("si_position", "only applies to recipes that train the mdt architecture "
                 "(--recipes mdt, or --arch mdt)")

    def arch_of(self, recipe_name: str) -> str:
        """The architecture ``recipe_name`` trains here (pretrain.py's mapping)."""
        from unidiff.train.config import resolve_arch

        return resolve_arch(recipe_name, self.arch)


def _device_count() -> int:
    import jax

    return jax.device_count()


def options_from_flags() -> Options:
    preset = PRESETS[_PRESET.value]
    pick = lambda flag, key: preset[key] if flag.value is None else flag.value  # noqa: E731
    recipes = tuple(r.strip() for r in pick(_RECIPES, "recipes").split(",") if r.strip())
    return Options(
        recipes=recipes, model=pick(_MODEL, "model"), image_size=pick(_IMAGE_SIZE, "image_size"),
        batch_size=(preset["batch_per_device"] * _device_count() if _BATCH_SIZE.value is None
                    else _BATCH_SIZE.value),
        steps=pick(_STEPS, "steps"),
        warmup_steps=pick(_WARMUP, "warmup_steps"), compute_dtype=pick(_DTYPE, "compute_dtype"),
        peak_flops=_PEAK.value, matmul_size=pick(_MATMUL, "matmul_size"), arch=_ARCH.value,
        num_classes=_NUM_CLASSES.value, seed=_SEED.value, interleave=_INTERLEAVE.value,
        si_position=_SI_POSITION.value, microbatches=_MICROBATCHES.value,
    )


# ---------------------------------------------------------------------------------------
class MatmulProbe:
    """A compiled (size x size) @ (size x size) matmul in the compute dtype: the FLOP/s
    reference for MFU. ``time_once`` times ``calls`` calls enqueued back to back, blocking
    on the last, and returns the time per call.

    Blocking on every call would add its dispatch and synchronisation to the matmul: on a
    GPU an 8192^2 bfloat16 matmul takes about 1.5 ms and that overhead tens of
    microseconds, which would lower the peak and raise the MFU by a few percent. So
    ``calls`` is as many as fill ``min_time_s`` (from one blocked call after compiling);
    where one call takes longer, as the cpu preset's 2048^2 float32 matmul (about 90 ms),
    it is 1 and each call is timed alone."""

    def __init__(self, size: int, dtype_name: str, min_time_s: float = 0.02):
        import jax
        import jax.numpy as jnp

        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
        ka, kb = jax.random.split(jax.random.key(1))
        self._args = (jax.random.normal(ka, (size, size), dtype), jax.random.normal(kb, (size, size), dtype))
        self._f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dtype))
        self._block = jax.block_until_ready
        self._block(self._f(*self._args))
        self.flops = 2.0 * size**3
        self.calls = 1
        self.calls = max(1, min(1000, math.ceil(min_time_s / max(self.time_once(), 1e-9))))

    def time_once(self) -> float:
        out = None
        t0 = time.perf_counter()
        for _ in range(self.calls):
            out = self._f(*self._args)
        self._block(out)
        return (time.perf_counter() - t0) / self.calls

    def time_between(self) -> float:
        """One timing (``calls`` calls) after two untimed calls, for use between train steps. Right
        after a step the matmul runs slower for a call or two (matrices out of cache,
        thread pools settling): in one process alternating a DiT-recipe step with three
        timed calls, 12 rounds, the medians were 160.8, 169.4 and 172.9 GFLOP/s for
        the first, second and third call, against 171.9 and 171.3 for seven
        back-to-back calls before and after. A cold or half-warm probe would flatter
        the MFU, so the third call is the one timed."""
        self._block(self._f(*self._args))
        self._block(self._f(*self._args))
        return self.time_once()

    def rate(self, times: list[float]) -> float:
        """FLOP/s of the median of ``times``."""
        return self.flops / statistics.median(times)

    def back_to_back_rate(self, reps: int = 7) -> float:
        """FLOP/s of the median of ``reps`` calls in a row (before or after the recipes)."""
        return self.rate([self.time_once() for _ in range(reps)])


def model_config(opts: Options, recipe_name: str):
    """The architecture training would use for this recipe (pretrain.py's mapping)."""
    from unidiff.train.config import TrainConfig
    from unidiff.train.loop import model_config_for

    si_position = opts.si_position if opts.arch_of(recipe_name) == "mdt" else None
    cfg = TrainConfig(workdir="-", recipe=recipe_name, arch=opts.arch, model=opts.model, train_steps=1,
                      batch_size=opts.batch_size, image_size=opts.image_size,
                      compute_dtype=opts.compute_dtype, class_conditional=opts.num_classes > 0,
                      si_position=si_position)
    cfg.validate()
    return cfg.resolved_arch(), model_config_for(cfg, opts.image_size, opts.channels, opts.num_classes)


def check_recipes(opts: Options) -> None:
    """Every recipe's architecture builds at these settings and its masks fit the tokens;
    ValueError naming the flag otherwise (before anything is measured)."""
    import jax

    from unidiff import corruption as uc
    from unidiff.train.step import check_microbatches, check_model_fits_recipe

    # The step shards the batch over every device (make_mesh()).
    if opts.batch_size % jax.device_count():
        raise ValueError(f"--batch_size: {opts.batch_size} is not divisible by the "
                         f"{jax.device_count()} devices")
    for name in opts.recipes:
        arch, mcfg = model_config(opts, name)
        recipe = uc.recipes.get(name)
        try:
            check_microbatches(opts.batch_size, recipe.r_t0, jax.device_count(), opts.microbatches)
        except ValueError as e:
            raise ValueError(f"--microbatches {opts.microbatches} (--recipes {name}): {e}") from None
        try:
            recipe.validate_for(mcfg.num_tokens)
        except ValueError as e:
            raise ValueError(f"--recipes {name}: {e} (the image has {mcfg.num_tokens} tokens)") from None
        try:
            check_model_fits_recipe(mcfg, recipe)
        except ValueError as e:
            raise ValueError(f"--recipes {name} with --arch {arch}: {e}") from None


def _peak_memory(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def _cache_entry(config, key) -> tuple:
    import jax

    return (config, tuple(jax.device_get(jax.random.key_data(key)).ravel().tolist()))


def _initial_params(model, key, cache: dict | None):
    """``model.init(key)``, computed once per (architecture, key) in a suite run.

    Compiling the jitted init costs 4-6 s on 2 CPU cores, and dit, maskdit and umd share
    one ``ModelConfig`` at the defaults. The values are those of a fresh ``model.init``
    (same config, same key). The cached copy lives on the host because the train step
    donates, and so invalidates, the device buffers of its state.
    """
    import jax
    import jax.numpy as jnp

    if cache is None:
        return model.init(key)
    entry = _cache_entry(model.config, key)
    if entry not in cache:
        cache[entry] = jax.device_get(model.init(key))
    return jax.tree.map(jnp.asarray, cache[entry])


@dataclasses.dataclass
class InitProgram:
    """The suite's parameter initialisation, traced and lowered, not yet compiled: one
    jitted program running ``model.init`` for every architecture not already cached.

    One program for all the suite's architectures compiles in less time than one per
    architecture (dit/mae/mdt at the cpu preset: 8.9 s against 3 x 4.6-5.2 s), because
    XLA reuses the kernels of the shapes they share. Each ``model.init`` runs unchanged
    inside it, so the values are those of separate calls (bitwise: tested).
    """

    configs: list
    key: Any
    lowered: Any

    def shapes(self) -> dict:
        """Each config's parameter shapes (``jax.ShapeDtypeStruct`` trees), known from
        the lowering, before anything is compiled or run."""
        return dict(zip(self.configs, self.lowered.out_info))

    def run(self, cache: dict) -> None:
        """Compile and run the program; put each config's parameters, on the host, in
        ``cache`` (see ``_initial_params``)."""
        import jax

        params = jax.device_get(self.lowered.compile()(self.key))
        for c, p in zip(self.configs, params):
            cache[_cache_entry(c, self.key)] = p


def lower_init(configs, key, cache: dict) -> InitProgram | None:
    """The ``InitProgram`` of the configs missing from ``cache``; None if none is."""
    import jax

    from unidiff import models as um

    todo = [c for c in dict.fromkeys(configs) if _cache_entry(c, key) not in cache]
    if not todo:
        return None
    models = [um.Model(c) for c in todo]
    return InitProgram(todo, key, jax.jit(lambda k: tuple(m.init(k) for m in models)).lower(key))


def fill_init_cache(configs, key, cache: dict) -> None:
    """Fill ``cache`` (see ``_initial_params``) for every config in one jitted call."""
    program = lower_init(configs, key, cache)
    if program is not None:
        program.run(cache)


def _param_shapes(config, key, cache: dict | None):
    """The parameter shapes of ``config`` from its cached values; None when they are not
    cached (``lower_recipe`` then traces its own model's init for them)."""
    import jax

    entry = None if cache is None else cache.get(_cache_entry(config, key))
    if entry is None:
        return None
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), entry)


def _init_key(opts: Options):
    """The parameter key of every recipe (and the state key), from ``--seed``."""
    import jax

    return jax.random.split(jax.random.key(opts.seed))


@dataclasses.dataclass
class PreparedRecipe:
    """One recipe's compiled train step with its state and batch, ready to be timed."""

    name: str
    record: dict[str, Any]  # everything known before stepping
    compiled: Any
    state: Any
    batch: Any
    metrics: Any = None
    times: list[float] = dataclasses.field(default_factory=list)

    def step(self) -> float:
        """One step, blocked on (new state, metrics); returns its wall time in seconds."""
        import jax

        t0 = time.perf_counter()
        self.state, self.metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, self.metrics))
        return time.perf_counter() - t0

    def finish(self) -> dict[str, Any]:
        """The record, from the timed steps in ``times``; releases the state."""
        import jax

        step_time = statistics.median(self.times)
        rec = dict(self.record)
        rec.update(
            step_time_s=step_time,
            step_times_s=list(self.times),
            images_per_s=rec["batch_size"] / step_time,
            achieved_flops=rec["flops_per_step"] / step_time,
            loss=float(self.metrics["loss"]),
            peak_memory_bytes=_peak_memory(jax.devices()[0]),
        )
        self.state = self.batch = self.compiled = None
        return rec


@dataclasses.dataclass
class LoweredRecipe:
    """One recipe's train step traced and lowered for its state's shapes (no state is
    built yet), with its synthetic batch: what XLA compiles next."""

    name: str
    record: dict[str, Any]  # everything known before compiling
    lowered: Any
    model: Any
    optimizer: Any
    mesh: Any
    batch: Any
    keys: tuple  # (parameter key, state key)


def lower_recipe(opts: Options, recipe_name: str, param_shapes=None) -> LoweredRecipe:
    """Build the real train step of one recipe and lower it on a synthetic batch.

    The step is lowered for the state's shapes and shardings (``param_shapes``: the
    parameters' ``jax.ShapeDtypeStruct`` tree; traced from ``model.init`` if None), so it
    needs no initialised parameters; the compiled step is then called on the real state.
    """
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from unidiff import corruption as uc
    from unidiff import flops as uflops
    from unidiff import models as um
    from unidiff.train.optim import OptimConfig, make_optimizer
    from unidiff.train.state import init_state
    from unidiff.train.step import StepConfig, make_mesh, make_train_step, shard_batch

    arch, mcfg = model_config(opts, recipe_name)
    recipe = uc.recipes.get(recipe_name)
    recipe.validate_for(mcfg.num_tokens)
    mesh = make_mesh()
    num_devices = mesh.devices.size
    if opts.batch_size % num_devices:
        raise ValueError(f"--batch_size: {opts.batch_size} is not divisible by the {num_devices} devices")

    model = um.Model(mcfg)
    k_init, k_state = _init_key(opts)
    optim_cfg = OptimConfig(batch_size=opts.batch_size, total_steps=10_000, warmup_steps=10)
    optimizer = make_optimizer(optim_cfg)
    if param_shapes is None:
        param_shapes = jax.eval_shape(model.init, k_init)
    # The state as ``finish_recipe`` builds it: replicated on every device (step.replicate).
    replicated = NamedSharding(mesh, P())
    state_shapes = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated, weak_type=s.weak_type),
        jax.eval_shape(lambda p: init_state(p, optimizer, k_state, use_ema=False), param_shapes))
    step_cfg = StepConfig(patch_size=mcfg.patch_size, num_classes=opts.num_classes,
                          compute_dtype=opts.compute_dtype, microbatches=opts.microbatches)
    train_step = make_train_step(model, recipe, optimizer, mesh, opts.batch_size, step_cfg)

    rng = np.random.default_rng(opts.seed)
    shape = (opts.batch_size, opts.image_size, opts.image_size, opts.channels)
    batch = shard_batch(
        {"image": rng.uniform(-1, 1, shape).astype(np.float32),
         "label": rng.integers(0, max(opts.num_classes, 1), opts.batch_size).astype(np.int32)},
        mesh, opts.batch_size,
    )

    t0 = time.perf_counter()
    lowered = train_step.lower(state_shapes, batch)
    lower_time = time.perf_counter() - t0

    fl = uflops.train_step_flops(mcfg, recipe, opts.batch_size, num_devices)
    record = {
        "recipe": recipe_name,
        "model": opts.model,
        "arch": arch,
        "image_size": opts.image_size,
        "batch_size": opts.batch_size,
        "microbatches": opts.microbatches,
        "compute_dtype": opts.compute_dtype,
        "num_devices": num_devices,
        "lower_time_s": lower_time,
        "flops_per_step": fl["total"],
        "mfu": None,  # filled in once the peak is known
        "branches": {k: {"rows": v["rows"], "encoder_tokens": v["encoder_tokens"],
                         "decoder_tokens": v["decoder_tokens"]} for k, v in fl["branches"].items()},
    }
    return LoweredRecipe(recipe_name, record, lowered, model, optimizer, mesh, batch, (k_init, k_state))


def compile_recipe(low: LoweredRecipe) -> tuple[Any, float, bool]:
    """XLA's compilation of a lowered step: (the executable, seconds, whether it was loaded
    from JAX's persistent compilation cache instead of compiled)."""
    import jax

    hits, me = [], threading.get_ident()

    def listener(event: str, **_) -> None:
        # Only this thread's: another may compile (or load) something else meanwhile.
        if event == _CACHE_HIT_EVENT and threading.get_ident() == me:
            hits.append(event)

    jax.monitoring.register_event_listener(listener)
    try:
        t0 = time.perf_counter()
        compiled = low.lowered.compile()
        return compiled, time.perf_counter() - t0, bool(hits)
    finally:
        jax.monitoring.unregister_event_listener(listener)


def finish_recipe(low: LoweredRecipe, compiled, compile_s: float, cached: bool,
                  init_cache: dict | None) -> PreparedRecipe:
    """The compiled step with its state (initial parameters from ``init_cache``) and
    the record completed with the compile time and XLA's analyses of the executable."""
    from unidiff.train.state import init_state
    from unidiff.train.step import replicate

    temp_bytes = None
    try:
        mem = compiled.memory_analysis()
        temp_bytes = None if mem is None else int(mem.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend implements it
        pass
    num_devices = low.record["num_devices"]
    record = dict(low.record)
    record.update(
        # Tracing and lowering plus XLA's compilation: the time to build the step.
        compile_time_s=low.record["lower_time_s"] + compile_s,
        xla_compile_time_s=compile_s,
        # Loaded from the persistent compilation cache: then the XLA time is a load's.
        compile_cache_hit=cached,
        xla_temp_bytes=temp_bytes,
        # XLA's own count for the compiled step (dots and elementwise ops, all devices):
        # close to flops_per_step means no work the FLOP model leaves out, e.g. on
        # hidden tokens or recomputation.
        # None under --microbatches: cost analysis counts the accumulation loop's body
        # once, not once per microbatch, and would read as a FLOP model M times too high.
        xla_flops_per_step=(_xla_flops(compiled, num_devices)
                            if low.record["microbatches"] == 1 else None),
    )
    k_init, k_state = low.keys
    params = _initial_params(low.model, k_init, init_cache)
    state = replicate(init_state(params, low.optimizer, k_state, use_ema=False), low.mesh)
    return PreparedRecipe(low.name, record, compiled, state, low.batch)


def prepare_recipe(opts: Options, recipe_name: str, init_cache: dict | None = None) -> PreparedRecipe:
    """Build and compile the real train step of one recipe on a synthetic batch.

    ``init_cache`` (a dict, filled here) shares initial parameters between recipes with
    the same architecture; ``None`` initialises afresh.
    """
    _, mcfg = model_config(opts, recipe_name)
    low = lower_recipe(opts, recipe_name, _param_shapes(mcfg, _init_key(opts)[0], init_cache))
    return finish_recipe(low, *compile_recipe(low), init_cache)


def prepare_recipes(opts: Options, init_cache: dict, log=print) -> list[PreparedRecipe]:
    """Every recipe of ``opts`` compiled, with its state, as ``prepare_recipe`` builds it.

    Tracing and lowering run in Python and hold the GIL; XLA's compilation releases it.
    So one worker thread compiles (the parameter initialisation first, then each step in
    turn) while this thread traces and lowers the next recipe. One compilation at a time:
    XLA already keeps about 1.3 of 2 CPU cores busy on its own, and two at once took as
    long as one after the other (benchmarks/README.md, "Compilation"). Each recipe's
    ``lower_time_s`` and ``xla_compile_time_s`` are timed on their own threads, and
    ``compile_time_s`` is their sum, as in ``prepare_recipe``.
    """
    from concurrent.futures import ThreadPoolExecutor

    k_init = _init_key(opts)[0]
    configs = {name: model_config(opts, name)[1] for name in opts.recipes}
    program = lower_init(list(configs.values()), k_init, init_cache)
    shapes = {} if program is None else program.shapes()
    pool = ThreadPoolExecutor(1, thread_name_prefix="xla-compile")
    try:
        initialised = None if program is None else pool.submit(program.run, init_cache)
        pending = []
        for name in opts.recipes:
            cfg = configs[name]
            param_shapes = shapes[cfg] if cfg in shapes else _param_shapes(cfg, k_init, init_cache)
            low = lower_recipe(opts, name, param_shapes)
            pending.append((low, pool.submit(compile_recipe, low)))
        if initialised is not None:
            initialised.result()
        prepared = []
        for low, compiling in pending:
            prepared.append(finish_recipe(low, *compiling.result(), init_cache))
            rec = prepared[-1].record
            log(f"  {low.name}: compiled in {rec['compile_time_s']:.1f} s "
                f"(lowering {rec['lower_time_s']:.1f} s, XLA {rec['xla_compile_time_s']:.1f} s"
                + (", loaded from the compilation cache)" if rec["compile_cache_hit"] else ")"))
        return prepared
    finally:
        # On an error, compilations not yet started are dropped; the running one ends.
        pool.shutdown(wait=True, cancel_futures=True)


def time_recipes(
    prepared: list[PreparedRecipe], steps: int, warmup_steps: int, interleave: bool,
    probe: MatmulProbe | None = None,
) -> list[float]:
    """Warm up, then time ``steps`` steps of each recipe into its ``times``; returns the
    times of the ``probe`` matmul taken between the timed steps (empty without a probe).

    Interleaved, step i of every recipe runs before step i + 1 of any, so the step-time
    ratios between recipes compare steps taken minutes apart at most, not recipes run
    at different times of a shared host's day; the probe runs once after each round.
    Otherwise each recipe runs all its steps in turn, the probe once after each timed
    step. Either way the peak that MFU divides by is measured in the same minutes as
    the steps, under the same load of the shared host.
    """
    probe_times: list[float] = []
    if interleave:
        for _ in range(warmup_steps):
            for p in prepared:
                p.step()
        for _ in range(steps):
            for p in prepared:
                p.times.append(p.step())
            if probe is not None:
                probe_times.append(probe.time_between())
        return probe_times
    for p in prepared:
        for _ in range(warmup_steps):
            p.step()
        for _ in range(steps):
            p.times.append(p.step())
            if probe is not None:
                probe_times.append(probe.time_between())
    return probe_times


def bench_recipe(
    opts: Options, recipe_name: str, init_cache: dict | None = None, probe: MatmulProbe | None = None,
) -> tuple[dict[str, Any], list[float]]:
    """Compile and time the real train step of one recipe: its JSON record, and the
    probe's times between the steps (empty without a probe)."""
    prepared = prepare_recipe(opts, recipe_name, init_cache)
    probe_times = time_recipes([prepared], opts.steps, opts.warmup_steps, interleave=False, probe=probe)
    return prepared.finish(), probe_times


def _xla_flops(compiled, num_devices: int) -> float | None:
    """FLOPs of one step by XLA's cost analysis of the per-device program, times devices."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"]) * num_devices


def dit_flops(opts: Options) -> int:
    """FLOP-model cost of the DiT recipe at these settings (the ratio's denominator)."""
    from unidiff import corruption as uc
    from unidiff import flops as uflops

    from unidiff.train.step import check_model_fits_recipe

    _, mcfg = model_config(opts, "dit")
    try:
        check_model_fits_recipe(mcfg, uc.recipes.dit())
    except ValueError:
        # --arch cannot train DiT (mdt has no eps head): the dit recipe on its own
        # architecture, as a --recipes=dit run without --arch measures it.
        _, mcfg = model_config(dataclasses.replace(opts, arch="auto"), "dit")
    return uflops.train_step_flops(mcfg, uc.recipes.dit(), opts.batch_size)["total"]


def run_suite(opts: Options, log=print) -> list[dict[str, Any]]:
    """Benchmark every recipe of ``opts``; returns the records (also logged as a table)."""
    import jax

    opts.validate()
    check_recipes(opts)
    device = jax.devices()[0]
    log(f"device: {device.platform} {device.device_kind} x{jax.device_count()}; "
        f"model {opts.model}, {opts.image_size}x{opts.image_size}, batch {opts.batch_size}, "
        f"{opts.compute_dtype}, {opts.steps} timed steps after {opts.warmup_steps} warm-up"
        + (f", gradients accumulated over {opts.microbatches} microbatches"
           if opts.microbatches > 1 else ""))
    cache_dir = jax.config.jax_compilation_cache_dir
    if cache_dir:
        log(f"compilation cache: {cache_dir} (a program found there is loaded, not compiled)")
    probe, peaks, probe_times = None, {}, []
    if opts.peak_flops is None:
        probe = MatmulProbe(opts.matmul_size, opts.compute_dtype)
        peaks["before"] = probe.back_to_back_rate()
        per = "" if probe.calls == 1 else f", {probe.calls} calls per timing"
        log(f"matmul peak ({opts.matmul_size}^2, {opts.compute_dtype}{per}): {peaks['before'] / 1e9:.1f} GFLOP/s")
    records, init_cache = [], {}

    def log_record(rec: dict[str, Any]) -> None:
        xla = rec["xla_flops_per_step"]
        xla_note = "" if xla is None else f", XLA counts {xla / rec['flops_per_step']:.3f}x the FLOP model"
        log(f"  {rec['recipe']}: compile {rec['compile_time_s']:.1f} s, step {rec['step_time_s']:.3f} s, "
            f"{rec['images_per_s']:.2f} img/s, loss {rec['loss']:.4f}{xla_note}")

    if opts.interleave:
        prepared = prepare_recipes(opts, init_cache, log)
        log(f"timing {opts.steps} steps of each recipe in turns")
        probe_times = time_recipes(prepared, opts.steps, opts.warmup_steps, interleave=True, probe=probe)
        records = [p.finish() for p in prepared]
        for rec in records:
            log_record(rec)
    else:
        fill_init_cache([model_config(opts, name)[1] for name in opts.recipes], _init_key(opts)[0], init_cache)
        for name in opts.recipes:
            record, times = bench_recipe(opts, name, init_cache, probe)
            records.append(record)
            probe_times.extend(times)
            log_record(record)
    if opts.peak_flops is None:
        peaks["during"] = probe.rate(probe_times)
        peaks["after"] = probe.back_to_back_rate()
        log(f"matmul peak between the timed steps ({len(probe_times)} samples): "
            f"{peaks['during'] / 1e9:.1f} GFLOP/s; after the recipes: {peaks['after'] / 1e9:.1f} GFLOP/s")
        # MFU divides by the peak measured between the steps: the shared host's speed
        # moves by up to 20% within minutes, and a peak taken before or after the steps
        # can come from a faster or slower spell than the steps themselves.
        peak, source = peaks["during"], "measured between the steps"
    else:
        peak, source = opts.peak_flops, "flag"

    dit_time = next((r["step_time_s"] for r in records if r["recipe"] == "dit"), None)
    dit_fl = dit_flops(opts)
    for r in records:
        # achieved_flops is the whole mesh's (the global batch's FLOPs per step), while the
        # peak is one device's (the probe runs on device 0; --peak_flops says per device).
        r["mfu"] = r["achieved_flops"] / (peak * r["num_devices"])
        r["peak_flops"] = peak
        r["peak_flops_source"] = source
        r["matmul_peaks_flops"] = peaks
        r["matmul_calls_per_timing"] = None if probe is None else probe.calls
        r["device"] = f"{device.platform} {device.device_kind}"
        r["step_time_rel_dit"] = None if dit_time is None else r["step_time_s"] / dit_time
        r["flops_rel_dit"] = r["flops_per_step"] / dit_fl
        r["timing"] = "interleaved" if opts.interleave and len(records) > 1 else "sequential"
    log(format_table(records))
    return records


def format_table(records: list[dict[str, Any]]) -> str:
    head = ("recipe", "arch", "enc tokens", "compile s", "step s", "img/s", "GFLOP/step",
            "GFLOP/s", "MFU", "time/DiT", "FLOPs/DiT", "peak mem")
    rows = []
    for r in records:
        toks = "+".join(f"{v['rows']}x{v['encoder_tokens']}" for v in r["branches"].values())
        rel = "n/a" if r["step_time_rel_dit"] is None else f"{r['step_time_rel_dit']:.3f}"
        mem = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"
        rows.append((r["recipe"], r["arch"], toks,
                     f"{r['compile_time_s']:.1f}" + (" (cache)" if r["compile_cache_hit"] else ""),
                     f"{r['step_time_s']:.3f}",
                     f"{r['images_per_s']:.2f}", f"{r['flops_per_step'] / 1e9:.1f}",
                     f"{r['achieved_flops'] / 1e9:.1f}", f"{100 * r['mfu']:.1f}%", rel,
                     f"{r['flops_rel_dit']:.3f}", mem))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(row) for row in rows)])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        opts = options_from_flags()
        opts.validate()
        check_recipes(opts)
        if _JSON.value:
            check_output_file("json", _JSON.value)
        use_compilation_cache(_COMPILATION_CACHE.value)
    except ValueError as e:  # ConfigError included
        raise app.UsageError(str(e)) from None
    records = run_suite(opts, log=lambda s: print(s, flush=True))
    if _JSON.value:
        with atomic_write(_JSON.value, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {len(records)} records to {_JSON.value}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
