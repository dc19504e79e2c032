"""experiments/sample.py end to end on tiny workdirs: outputs, determinism, bad input."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.e2e_helpers import ROOT, read_metrics, run_binary


def _npz(path):
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def test_finetune_logs_and_keeps_the_pretrained_encoder(tiny_pretrained, tiny_finetuned):
    cfg = json.loads((tiny_finetuned / "config.json").read_text())
    pre = json.loads((tiny_pretrained / "config.json").read_text())
    assert cfg["recipe"] == "umd_finetune" and cfg["class_conditional"] is True
    assert (cfg["model"], cfg["image_size"]) == (pre["model"], pre["image_size"])
    steps = [m["step"] for m in read_metrics(tiny_finetuned)]
    assert steps == [1, 2, 3]
    assert all(np.isfinite(m["loss"]) for m in read_metrics(tiny_finetuned))


def test_sample_writes_grid_and_npz_with_guidance(tiny_finetuned, tmp_path):
    out = tmp_path / "grid.png"
    args = [f"--workdir={tiny_finetuned}", "--num_samples=5", "--labels=1,3", "--steps=3",
            "--batch_size=4", "--guidance=2", "--guidance_schedule=power_cosine",
            f"--out={out}"]
    proc = run_binary("sample.py", args)
    assert "EMA" in proc.stdout
    d = _npz(tmp_path / "grid.npz")
    assert d["images"].dtype == np.uint8 and d["images"].shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(d["labels"], [1, 3, 1, 3, 1])
    # Different noise per sample: no two samples are identical.
    flat = d["images"].reshape(5, -1)
    assert len({row.tobytes() for row in flat}) == 5
    # Grid: one column per listed label (2), ceil(5/2) = 3 rows of 8 px cells with 1 px
    # borders, enlarged 8x by the default zoom (cells of at least 64 px).
    png = np.asarray(Image.open(out))
    assert png.shape[:2] == ((3 * 9 + 1) * 8, (2 * 9 + 1) * 8)
    # The first cell of the grid is the first sample, zoomed.
    cell = png[8:8 + 64:8, 8:8 + 64:8]
    np.testing.assert_array_equal(cell, d["images"][0])

    # The library's sampler on the EMA parameters gives the same images: each batch i with
    # key fold_in(key(seed), i), its labels in turn, the short last batch padded and cut.
    # (It cannot tell the labels apart: after 3 finetune steps from adaLN-Zero they move
    # the images by about 1e-7, below the uint8 step.)
    import jax
    from unidiff import corruption as uc
    from unidiff import sampling as us
    from unidiff.train import workdir as wd

    run = wd.load_workdir(str(tiny_finetuned), None)
    ema, _ = wd.load_params(run, True)
    patch = run.model.config.patch_size
    spec = us.GuidanceSpec(2.0, null_label=run.null_label, schedule="power_cosine", power=4.0)

    @jax.jit
    def library(key, labels):
        def denoise(x, t, y):
            out = run.model.apply(ema, uc.patchify(x, patch), t, y, None)
            return tuple(uc.unpatchify(v, patch, 8, 8) for v in (out.x0, out.eps))
        return us.ddim_sample(denoise, run.schedule, key, (4, 8, 8, 3), labels, steps=3, eta=1.0,
                              head="eps", guidance=spec, clip_x0=True)

    root = jax.random.key(0)
    want = np.concatenate([np.asarray(library(jax.random.fold_in(root, 0), np.array([1, 3, 1, 3]))),
                           np.asarray(library(jax.random.fold_in(root, 1), np.array([1, 1, 1, 1])))[:1]])
    np.testing.assert_array_equal(
        np.clip(np.round((want + 1.0) * 127.5), 0, 255).astype(np.uint8), d["images"])

    # Same seed and batch size -> the same samples.
    again = tmp_path / "again.png"
    run_binary("sample.py", [a if not a.startswith("--out") else f"--out={again}" for a in args])
    np.testing.assert_array_equal(_npz(tmp_path / "again.npz")["images"], d["images"])


def test_sample_unconditional_x0_head(tiny_pretrained, tmp_path):
    run_binary("sample.py", [f"--workdir={tiny_pretrained}", "--num_samples=3", "--steps=2",
                             "--eta=0", "--head=x0", f"--out={tmp_path / 'u.png'}"])
    d = _npz(tmp_path / "u.npz")
    assert d["images"].shape == (3, 8, 8, 3) and d["images"].dtype == np.uint8
    np.testing.assert_array_equal(d["labels"], [-1, -1, -1])
    assert (tmp_path / "u.png").exists()


BAD = [
    # (workdir, extra args, what the message must say: the flag or file, and why)
    ("ft", ["--labels=10"], ("--labels", "outside the model's classes 0..9")),
    ("ft", ["--guidance=-0.5"], "--guidance"),
    ("pre", ["--guidance=3"], ("--guidance", "class-conditional")),
    ("pre", ["--labels=1"], "--labels"),
    ("ft", ["--steps=0"], "--steps"),
    ("ft", ["--out=grid.jpg"], "--out"),
    ("nockpt", [], ("--workdir", "no checkpoint")),
    # An output path that cannot be written is refused before sampling; {tmp}/d.png is a folder.
    ("ft", ["--out={tmp}/d.png"], ("--out", "is a folder")),
    ("ft", ["--guidance=2", "--guidance_schedule=power_cosine", "--guidance_power=nan"], "--guidance_power"),
    ("missing", [], "--workdir"),
    ("ft", ["--eta=1.5"], ("--eta", "[0, 1]")),
    # Past int64 jax.random.key raised OverflowError (a traceback, status 1).
    ("ft", ["--seed=9223372036854775808"], "--seed"),
    ("ft", ["--seed=-9223372036854775809"], "--seed"),
    # -2**63 is an int64 and a valid seed: the flags are checked on, to the bad --zoom.
    ("ft", ["--seed=-9223372036854775808", "--zoom=-1"], "--zoom"),
    # A run that never saw a noisy step cannot denoise (MAE, USP: r_t0 = 1).
    ("clean_only", [], ("--workdir", "only the clean step", "r_t0 = 1")),
    # Guidance needs a null label trained in place of classes on noisy steps.
    ("no_dropout", ["--guidance=2"], ("--guidance", "label dropout 0.0")),
]


def _edited_config(src, dst, flags: dict, recipe: dict):
    """dst/config.json: src's, with training flags and the resolved recipe edited (no
    checkpoint: sample.py must refuse before it looks for one)."""
    dst.mkdir()
    raw = json.loads((src / "config.json").read_text())
    raw.update(flags)
    raw["resolved"]["recipe"].update(recipe)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


def test_bad_input_exits_with_one_line_naming_the_flag(tiny_pretrained, tiny_finetuned, tmp_path):
    nockpt = tmp_path / "nockpt"
    nockpt.mkdir()
    shutil.copy(tiny_finetuned / "config.json", nockpt / "config.json")
    (tmp_path / "d.png").mkdir()
    (tmp_path / "d.npz").write_bytes(b"an earlier result")
    dirs = {"ft": tiny_finetuned, "pre": tiny_pretrained, "nockpt": nockpt,
            "missing": tmp_path / "does_not_exist",
            "clean_only": _edited_config(tiny_pretrained, tmp_path / "clean_only",
                                         {"r_t0": 1.0}, {"r_t0": 1.0}),
            "no_dropout": _edited_config(tiny_finetuned, tmp_path / "no_dropout",
                                         {"label_dropout": 0.0}, {"label_dropout": 0.0})}
    # Started together: each fails before compiling anything.
    procs = [
        (case, subprocess.Popen(
            [sys.executable, str(ROOT / "experiments" / "sample.py"), f"--workdir={dirs[case[0]]}",
             f"--out={tmp_path / 'x.png'}", *(a.format(tmp=tmp_path) for a in case[1])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "JAX_PLATFORMS": "cpu"}))
        for case in BAD
    ]
    for (which, extra, expect), proc in procs:
        out, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (which, extra, out, err)
        assert len(lines) == 1, (which, extra, err)
        assert lines[0].startswith("sample.py: error: "), lines
        for part in (expect if isinstance(expect, tuple) else (expect,)):
            assert part in lines[0], (extra, lines)
    assert not (tmp_path / "x.png").exists()
    assert (tmp_path / "d.npz").read_bytes() == b"an earlier result"
