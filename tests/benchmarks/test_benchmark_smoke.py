"""The throughput suite keeps working: its command line runs two recipes for 2 steps at
a tiny size and writes well-formed records; the recipes' steps are timed in turns.
Speed is never asserted here."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e_helpers import communicate_all

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "step_throughput.py"
KEYS = ("recipe", "model", "image_size", "batch_size", "compile_time_s", "step_time_s",
        "images_per_s", "flops_per_step", "achieved_flops", "mfu")


def _start(tmp_path, *args, **env_extra) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **env_extra)
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(tmp_path, *args, **env_extra) -> subprocess.CompletedProcess:
    return communicate_all([_start(tmp_path, *args, **env_extra)])[0]


TINY_SUITE = ("--model=N/2", "--image_size=8", "--batch_size=8", "--steps=2", "--warmup_steps=1",
              "--matmul_size=256")


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    """The tiny suite of dit and umd, run once: (its process, its JSON path, the
    compilation cache it filled, from empty, with every program however quick to compile;
    JAX's default threshold is 1 s)."""
    tmp = tmp_path_factory.mktemp("suite")
    out, cache = tmp / "records.json", tmp / "xla_cache"
    proc = _run(tmp, "--recipes=dit,umd", *TINY_SUITE, f"--json={out}",
                f"--compilation_cache_dir={cache}", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return proc, out, cache


def test_suite_runs_two_recipes_and_writes_records(suite_run):
    proc, out, _ = suite_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())
    assert [r["recipe"] for r in records] == ["dit", "umd"]
    for r in records:
        assert set(KEYS) <= set(r)
        assert r["model"] == "N/2" and r["image_size"] == 8 and r["batch_size"] == 8
        for key in ("compile_time_s", "step_time_s", "images_per_s", "flops_per_step",
                    "achieved_flops", "mfu", "peak_flops"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, key
        assert len(r["step_times_s"]) == 2
        assert r["images_per_s"] == pytest.approx(8 / r["step_time_s"])
        assert r["achieved_flops"] == pytest.approx(r["flops_per_step"] / r["step_time_s"])
        assert r["num_devices"] == 1
        assert r["mfu"] == pytest.approx(r["achieved_flops"] / r["peak_flops"])
        assert math.isfinite(r["loss"])
        assert r["compile_cache_hit"] is False  # the cache was empty: compiled
        assert r["timing"] == "interleaved"  # the default: recipes' steps taken in turns
        # XLA's own count of the compiled step agrees with the FLOP model (elementwise
        # ops add a few percent). Running UMD's encoder on hidden tokens, or recomputing
        # blocks, would put it far above: the FLOP model of this umd config with an encoder
        # on all 16 tokens is 1.43x the masked one.
        assert 0.95 <= r["xla_flops_per_step"] / r["flops_per_step"] <= 1.2, r["xla_flops_per_step"]
    dit, umd = records
    # UMD masks tokens: the FLOP model must see a cheaper step than DiT's.
    assert umd["flops_per_step"] < dit["flops_per_step"]
    assert dit["flops_rel_dit"] == 1.0 and dit["step_time_rel_dit"] == 1.0
    assert umd["flops_rel_dit"] == pytest.approx(umd["flops_per_step"] / dit["flops_per_step"])
    # The table is printed with one row per recipe.
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and "time/DiT" in table[0] and "FLOPs/DiT" in table[0]
    assert "(cache)" not in proc.stdout


def test_records_say_how_many_matmul_calls_each_peak_timing_took(suite_run):
    """The peak's ``calls`` per timing are in every record (and in the log line when more
    than one), so a peak measured one call at a time can be told from an amortised one."""
    proc, out, _ = suite_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = {r["matmul_calls_per_timing"] for r in json.loads(out.read_text())}
    assert len(calls) == 1, calls
    (n,) = calls
    assert isinstance(n, int) and 1 <= n <= 1000, n
    peak_line = next(line for line in (proc.stdout + proc.stderr).splitlines() if "matmul peak (" in line)
    assert (f"{n} calls per timing" in peak_line) == (n > 1), (n, peak_line)


def test_compilation_cache_loads_the_step_on_a_rerun(suite_run, tmp_path):
    """A rerun with the cache the suite above filled loads the DiT step instead of
    compiling it, says so in its record and its table, and runs the same program."""
    first_proc, first_out, cache = suite_run
    assert first_proc.returncode == 0, first_proc.stderr[-3000:]
    first = json.loads(first_out.read_text())[0]
    out = tmp_path / "records.json"
    proc = _run(tmp_path, "--recipes=dit", *TINY_SUITE, f"--json={out}",
                f"--compilation_cache_dir={cache}", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (second,) = json.loads(out.read_text())
    assert second["recipe"] == first["recipe"] == "dit"
    assert first["compile_cache_hit"] is False and second["compile_cache_hit"] is True
    assert "(cache)" in proc.stdout and "loaded from the compilation cache" in proc.stdout
    # The loaded program is the compiled one: same XLA cost analysis, same loss.
    assert second["xla_flops_per_step"] == first["xla_flops_per_step"]
    assert second["loss"] == first["loss"]


@pytest.mark.slow  # 9-15 s; the bfloat16 step itself is tested in tests/models and tests/train
def test_paper_preset_runs_in_bfloat16_with_overrides(tmp_path):
    # The GPU/TPU preset's bfloat16 step, shrunk by flags so it runs here: the preset
    # supplies the dtype, the flags override model, size, batch and steps (accumulated
    # over two microbatches).
    out = tmp_path / "records.json"
    proc = _run(tmp_path, "--preset=paper", "--recipes=mae", "--model=N/2", "--image_size=8",
                "--batch_size=4", "--steps=2", "--matmul_size=256", "--nointerleave",
                "--microbatches=2", f"--json={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rec,) = json.loads(out.read_text())
    assert rec["compute_dtype"] == "bfloat16" and rec["microbatches"] == 2
    assert (rec["model"], rec["image_size"], rec["batch_size"]) == ("N/2", 8, 4)
    assert len(rec["step_times_s"]) == 2 and math.isfinite(rec["loss"])
    assert rec["timing"] == "sequential"


def test_mfu_divides_by_the_peak_of_every_device(tmp_path):
    """On a 2-device mesh the step's FLOP/s are the two devices' together, and the peak
    (--peak_flops, or the probe on device 0) is one device's: MFU is achieved / (2 x
    peak), not achieved / peak (which read 2x too high). A batch the devices cannot
    share is refused, naming --batch_size, before anything is measured. A preset's batch
    is per device."""
    two = dict(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = tmp_path / "records.json"
    common = ("--recipes=dit", "--model=P/2", "--image_size=8", "--steps=1")
    # Two independent processes, started together. Without --batch_size the preset's
    # batch is per device: 4 (cpu preset) on each of 2.
    procs = [
        _start(tmp_path, *common, "--warmup_steps=0", "--peak_flops=1e9", f"--json={out}", **two),
        _start(tmp_path, *common, "--batch_size=3", "--matmul_size=64", **two),
    ]
    measured, refused = communicate_all(procs)
    assert measured.returncode == 0, measured.stderr[-3000:]
    (rec,) = json.loads(out.read_text())
    assert (rec["num_devices"], rec["batch_size"], rec["peak_flops"]) == (2, 8, 1e9)
    assert rec["mfu"] == pytest.approx(rec["flops_per_step"] / rec["step_time_s"] / 2e9)
    assert refused.returncode != 0
    assert "--batch_size: 3 is not divisible by the 2 devices" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr and "matmul peak" not in refused.stdout


BAD_FLAGS = [  # (args, substrings of stderr): main()'s own checks, run as the binary
    (["--recipes=dit,nope"], ("--recipes", "nope")),
    (["--json={tmp}"], ("--json", "is a folder")),
    (["--compilation_cache_dir=/dev/null"], ("--compilation_cache_dir /dev/null", "is a file")),
]


def test_bad_flag_names_the_flag(tmp_path):
    # Started together: each is a Python start-up and jax import, one after the other
    # they took about 2 s apiece.
    procs = communicate_all([_start(tmp_path, *(a.format(tmp=tmp_path) for a in args), "--steps=1")
                             for args, _ in BAD_FLAGS])
    for (args, needles), proc in zip(BAD_FLAGS, procs):
        assert proc.returncode != 0, args
        for needle in needles:
            assert needle in proc.stderr, (args, proc.stderr[-2000:])
        assert "matmul peak" not in proc.stdout, args  # refused before anything was measured


# Options that validate() and check_recipes() refuse (main() runs both before anything
# is measured, as the binary cases above show): checked in this process, where each
# case costs no Python start-up and jax import.
BAD_OPTIONS = [  # (overrides of the cpu preset, substrings of the message)
    (dict(model="N/0"), ("--model", "N/0")),
    (dict(model="N/2", image_size=9), ("--image_size 9",)),
    (dict(recipes=("umd",), arch="dit", model="N/2"), ("--recipes umd with --arch dit", "mask token")),
    (dict(recipes=("mdt",), model="P/2"), ("--si_position", "set --si_position")),
    (dict(recipes=("dit", "umd"), si_position=1), ("--si_position", "mdt architecture")),
    (dict(recipes=("dit",), batch_size=8, microbatches=3), ("--microbatches 3", "not divisible")),
    (dict(recipes=("umd",), batch_size=8, microbatches=8), ("--microbatches 8", "4 clean")),
]


@pytest.mark.parametrize("overrides,needles", BAD_OPTIONS)
def test_bad_options_name_the_flag(bench, overrides, needles):
    preset = bench.PRESETS["cpu"]
    opts = bench.Options(recipes=tuple(preset["recipes"].split(",")), model=preset["model"],
                         image_size=preset["image_size"], batch_size=preset["batch_per_device"],
                         steps=1)
    opts = dataclasses.replace(opts, **overrides)
    with pytest.raises(ValueError) as e:
        opts.validate()
        bench.check_recipes(opts)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def _bench_module():
    """The benchmark script loaded as a module, once per test module: it defines absl
    flags, and absl refuses a second definition from a module object whose id matches
    the first's (ids are reused once the first module is garbage-collected)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("step_throughput_under_test", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look themselves up there
    try:
        spec.loader.exec_module(bench)
        yield bench
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture
def bench(_bench_module):
    return _bench_module


@pytest.mark.parametrize("interleave", [True, False])
def test_time_recipes_order_and_warmup(bench, interleave):
    """Interleaved, step i of every recipe runs before step i + 1 of any; sequential, one
    recipe's steps run together. Warm-up steps come first and are never timed. The peak
    probe runs between the timed steps only: after each round, or after each step."""
    calls = []

    class Fake(bench.PreparedRecipe):
        def step(self):
            calls.append(self.name)
            return float(len(calls))  # a distinct "time" per call, to see which were kept

    class Probe:
        def time_between(self):
            calls.append("P")
            return -float(len(calls))

    prepared = [Fake(name, {}, None, None, None) for name in ("a", "b", "c")]
    probe_times = bench.time_recipes(prepared, steps=3, warmup_steps=2, interleave=interleave, probe=Probe())
    if interleave:
        assert calls == ["a", "b", "c"] * 2 + ["a", "b", "c", "P"] * 3
        assert [p.times for p in prepared] == [[7.0, 11.0, 15.0], [8.0, 12.0, 16.0], [9.0, 13.0, 17.0]]
        assert probe_times == [-10.0, -14.0, -18.0]
    else:
        assert calls == sum(([n] * 2 + [n, "P"] * 3 for n in "abc"), [])
        assert [p.times for p in prepared] == [[3.0, 5.0, 7.0], [11.0, 13.0, 15.0], [19.0, 21.0, 23.0]]
        assert probe_times == [-4.0, -6.0, -8.0, -12.0, -14.0, -16.0, -20.0, -22.0, -24.0]
    # Without a probe nothing else runs.
    calls.clear()
    for p in prepared:
        p.times.clear()
    assert bench.time_recipes(prepared, steps=1, warmup_steps=0, interleave=interleave) == []
    assert calls == ["a", "b", "c"]


def test_matmul_probe_enqueues_short_matmuls_back_to_back(bench):
    """A matmul shorter than ``min_time_s`` is timed as ``calls`` calls enqueued back to
    back and one block on the last (dispatch and sync, paid once, no longer lower the
    peak on a GPU); the time is per call, and the FLOPs are one matmul's."""
    probe = bench.MatmulProbe(16, "float32", min_time_s=0.5)
    assert probe.flops == 2 * 16**3
    assert 1 < probe.calls <= 1000  # a 16^2 matmul takes microseconds, far below 0.5 s
    real, seen = probe._f, []

    def counted(*args):
        seen.append(len(args))
        return real(*args)

    probe._f = counted
    per_call = probe.time_once()
    assert seen == [2] * probe.calls and per_call > 0
    # A matmul longer than min_time_s is timed alone, one call at a time (the cpu preset).
    assert bench.MatmulProbe(16, "float32", min_time_s=0.0).calls == 1


def test_matmul_probe_time_is_per_call(bench, monkeypatch):
    """``time_once`` returns the time of one call, not of the ``calls`` enqueued together
    (that would lower the peak, and raise the MFU, by a factor of ``calls``). A fake clock
    advanced one second by each matmul call."""
    from types import SimpleNamespace

    clock = [0.0]
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    probe = bench.MatmulProbe(16, "float32", min_time_s=0.5)
    real = probe._f

    def one_second(*args):
        clock[0] += 1.0
        return real(*args)

    probe._f = one_second
    for calls in (1, 7):
        probe.calls = calls
        assert probe.time_once() == 1.0


def test_initial_params_are_shared_per_architecture_and_survive_donation(bench):
    """The suite initialises each architecture once: the cached parameters equal a fresh
    ``model.init`` with the same key, and each recipe gets its own device buffers (the
    train step donates its state, so a shared buffer would be invalid for the next)."""
    import jax
    import numpy as np

    import unidiff.models as um


    model = um.Model(um.ModelConfig(image_size=8, patch_size=2, in_channels=3, width=32, depth=1,
                                    decoder_depth=1, num_heads=2))
    key = jax.random.key(3)
    cache: dict = {}
    first = bench._initial_params(model, key, cache)
    assert len(cache) == 1 and next(iter(cache))[0] == model.config
    for leaf in jax.tree.leaves(first):
        leaf.delete()  # what donation does to the first recipe's state
    second = bench._initial_params(model, key, cache)
    fresh = model.init(key)
    assert jax.tree.structure(second) == jax.tree.structure(fresh)
    for a, b in zip(jax.tree.leaves(second), jax.tree.leaves(fresh)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Another key is another entry, not the first key's parameters.
    other = bench._initial_params(model, jax.random.key(4), cache)
    assert len(cache) == 2
    for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(model.init(jax.random.key(4)))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(fresh)))


def test_fill_init_cache_equals_separate_inits(bench):
    """One jitted init for several architectures gives each one exactly the parameters
    of its own ``model.init`` (bitwise), under the keys ``_initial_params`` looks up."""
    import dataclasses

    import jax
    import numpy as np

    import unidiff.models as um

    base = um.ModelConfig(image_size=8, patch_size=2, in_channels=3, width=32, depth=1,
                          decoder_depth=1, num_heads=2)
    configs = [base, dataclasses.replace(base, depth=2), base]  # a repeat is initialised once
    key = jax.random.key(5)
    cache: dict = {}
    bench.fill_init_cache(configs, key, cache)
    assert len(cache) == 2
    for cfg in configs[:2]:
        model = um.Model(cfg)
        got = bench._initial_params(model, key, cache)
        assert len(cache) == 2  # served from the cache, not initialised again
        want = model.init(key)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_microbatches_reach_the_train_step(bench, step_configs):
    """The benchmark times the step it was asked for: its --microbatches reaches the
    StepConfig (the update is the same either way, so no number would show otherwise)."""
    import unidiff.train.step as step_lib

    seen = step_configs(step_lib)  # prepare_recipe imports make_train_step when called
    opts = bench.Options(recipes=("dit",), model="P/2", image_size=8, batch_size=4, steps=1,
                         microbatches=2)
    prepared = bench.prepare_recipe(opts, "dit", None)
    assert [c.microbatches for c in seen] == [2] and prepared.record["microbatches"] == 2
    # XLA's cost analysis counts the accumulation loop's body once: 0.265x the FLOP model
    # at 4 microbatches, read as a FLOP model 4 times too high.
    assert "xla_flops_per_step" in prepared.record and prepared.record["xla_flops_per_step"] is None


def test_dit_reference_does_not_depend_on_spelling_out_the_arch(bench):
    """--recipes=mdt and --recipes=mdt --arch=mdt build one model, but the FLOPs/DiT
    column priced DiT on the mdt architecture (which cannot train it) for the second:
    1.816 against 1.344 for the same step."""
    common = dict(recipes=("mdt",), model="N/2", image_size=8, batch_size=4, steps=1)
    assert bench.model_config(bench.Options(**common), "mdt") == bench.model_config(
        bench.Options(**common, arch="mdt"), "mdt")
    assert bench.dit_flops(bench.Options(**common, arch="mdt")) == bench.dit_flops(bench.Options(**common))
    # Where the architecture can train DiT, DiT is priced on it, as the dit row times it.
    exact = bench.Options(**{**common, "recipes": ("dit",)}, arch="dit")
    assert bench.dit_flops(exact) != bench.dit_flops(bench.Options(**{**common, "recipes": ("dit",)}))


@pytest.mark.parametrize("peak", [math.inf, math.nan, 0.0, -1.0])
def test_peak_flops_must_be_finite_and_positive(bench, peak):
    opts = bench.Options(recipes=("dit",), model="P/2", image_size=8, batch_size=4, steps=1,
                         peak_flops=peak)
    with pytest.raises(ValueError, match="--peak_flops"):
        opts.validate()


def _tiny_opts(bench, recipes=("dit", "mae")):
    # dit and mae train different architectures (umd, umd_no_adaln): two initialisations.
    return bench.Options(recipes=recipes, model="P/2", image_size=8, batch_size=4, steps=1,
                         warmup_steps=0)


def test_prepare_recipes_equals_preparing_one_at_a_time(bench):
    """The pipelined preparation (steps lowered for the state's shapes while earlier ones
    compile, parameters initialised in the same worker) builds what ``prepare_recipe``
    builds one recipe at a time: the same initial state, bitwise, and the same step, whose
    first update gives the same loss and parameters."""
    import jax
    import numpy as np

    opts = _tiny_opts(bench)
    logged = []
    piped = bench.prepare_recipes(opts, {}, log=logged.append)
    assert [p.name for p in piped] == ["dit", "mae"] and len(logged) == 2
    cache: dict = {}
    bench.fill_init_cache([bench.model_config(opts, n)[1] for n in opts.recipes],
                          bench._init_key(opts)[0], cache)
    alone = [bench.prepare_recipe(opts, n, cache) for n in opts.recipes]

    def leaves(tree):
        return [np.asarray(x) for x in jax.tree.leaves(tree)]

    for p, q in zip(piped, alone):
        assert jax.tree.structure(p.state) == jax.tree.structure(q.state)
        for a, b in zip(leaves(p.state), leaves(q.state)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        rec = p.record
        assert rec["compile_time_s"] == pytest.approx(rec["lower_time_s"] + rec["xla_compile_time_s"])
        # Times differ, and the second preparation may load the step the first one put
        # in the tests' persistent compilation cache (conftest.py).
        def same(r):
            return {k: v for k, v in r.items() if not k.endswith("time_s") and k != "compile_cache_hit"}

        assert same(rec) == same(q.record)
        p.step(), q.step()
        assert float(p.metrics["loss"]) == float(q.metrics["loss"])
        for a, b in zip(leaves(p.state.params), leaves(q.state.params)):
            np.testing.assert_array_equal(a, b)


def test_init_program_shapes_are_the_parameters(bench):
    """The shapes the steps are lowered for, read from the init program before it runs,
    are those of the parameters it then computes."""
    import jax

    opts = _tiny_opts(bench)
    configs = [bench.model_config(opts, n)[1] for n in opts.recipes]
    key = bench._init_key(opts)[0]
    cache: dict = {}
    program = bench.lower_init(configs, key, cache)
    shapes = program.shapes()
    assert list(shapes) == configs and not cache  # lowered, nothing computed yet
    program.run(cache)
    assert bench.lower_init(configs, key, cache) is None  # all cached: nothing to lower
    for cfg in configs:
        got = cache[bench._cache_entry(cfg, key)]
        want = jax.tree.map(lambda s: (s.shape, s.dtype), shapes[cfg])
        assert jax.tree.map(lambda a: (a.shape, a.dtype), got) == want


def test_prepare_recipes_passes_on_a_failure_and_stops_compiling(bench, monkeypatch):
    """An error while a later recipe is lowered reaches the caller as it is, after the
    compilation already running has ended (no thread is left compiling behind it), and
    the compilations still queued (umd's, lowered before the error) are dropped."""
    import threading

    started, failing = threading.Event(), threading.Event()
    begun, ended = [], []
    real_compile, real_lower = bench.compile_recipe, bench.lower_recipe

    def compile_recipe(low):
        begun.append(low.name)
        started.set()
        failing.wait(timeout=60)
        time.sleep(0.5)  # still compiling when the error is raised
        out = real_compile(low)
        ended.append(low.name)
        return out

    def lower_recipe(opts, name, param_shapes=None):
        if name == "mae":
            started.wait(timeout=60)  # dit's compilation is under way
            failing.set()
            raise RuntimeError("lowering mae failed")
        return real_lower(opts, name, param_shapes)

    monkeypatch.setattr(bench, "compile_recipe", compile_recipe)
    monkeypatch.setattr(bench, "lower_recipe", lower_recipe)
    opts = _tiny_opts(bench, ("dit", "umd", "mae"))
    with pytest.raises(RuntimeError, match="lowering mae failed"):
        bench.prepare_recipes(opts, {}, log=lambda s: None)
    assert begun == ended == ["dit"]
    assert not [t for t in threading.enumerate() if t.name.startswith("xla-compile")]
