"""experiments/probe.py on tiny workdirs: the JSON result, noise_t auto, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.e2e_helpers import ROOT, run_binary
from unidiff.train.config import TrainConfig


def _result(proc):
    line = proc.stdout.strip().splitlines()[-1]
    return json.loads(line)


def test_probe_trained_and_random_init(tiny_pretrained, tiny_finetuned):
    trained = run_binary("probe.py", [f"--workdir={tiny_finetuned}", "--shots=2"])
    r = _result(trained)
    assert "top-1" in trained.stdout
    assert 0.0 <= r["top1"] <= 1.0
    # synthetic: 10 classes, test split of 64 images; finetune (r_t0 = 0.05) -> t = 0.
    assert (r["num_train"], r["num_test"], r["noise_t"], r["step"]) == (20, 64, 0, 3)
    assert r["random_init"] is False
    # Accuracy is a multiple of 1/64.
    assert abs(r["top1"] * 64 - round(r["top1"] * 64)) < 1e-9

    rand = _result(run_binary("probe.py", [f"--workdir={tiny_pretrained}", "--random_init",
                                           "--shots=3", "--noise_t=50", "--max_test=40"]))
    assert rand["random_init"] is True and rand["step"] == 0
    assert (rand["num_train"], rand["num_test"], rand["noise_t"]) == (30, 40, 50)

    pixels = _result(run_binary("probe.py", [f"--workdir={tiny_pretrained}", "--pixels",
                                             "--shots=2"]))
    assert pixels["features"] == "pixels" and 0.0 <= pixels["top1"] <= 1.0
    assert pixels["noise_t"] == 0


def test_probe_bad_input(tiny_pretrained, tmp_path):
    cases = [
        ([f"--workdir={tiny_pretrained}", "--shots=1000"], "--shots"),
        ([f"--workdir={tiny_pretrained}", "--noise_t=5000"], "--noise_t"),
        ([f"--workdir={tmp_path / 'nope'}"], "--workdir"),
        ([f"--workdir={tiny_pretrained}", "--test_split=bogus"], "--train_split/--test_split"),
        ([f"--workdir={tiny_pretrained}", "--pixels", "--random_init"], "--random_init"),
        ([f"--workdir={tiny_pretrained}", "--pixels", "--l2=nan"], "--l2"),
        # The pixels are never noised: --noise_t=50 was accepted and recorded in the JSON.
        ([f"--workdir={tiny_pretrained}", "--pixels", "--noise_t=50"], "--noise_t"),
        # jax.random.key(seed + 1) overflowed int64: a traceback.
        ([f"--workdir={tiny_pretrained}", "--seed=9223372036854775807"], "--seed"),
    ]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "experiments" / "probe.py"), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
             for args, _ in cases]
    for (args, flag), proc in zip(cases, procs):
        out, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (args, out, err)
        assert len(lines) == 1 and lines[0].startswith("probe.py: error: ") and flag in lines[0], (
            args, lines)


def _write_classes(root, per_class: int, seed: int):
    """Two classes of 8x8 RGB PNGs: dark noise (class 0, "a") and bright noise (class 1, "b")."""
    rng = np.random.default_rng(seed)
    for name, lo in (("a", 0), ("b", 160)):
        os.makedirs(root / name)
        for i in range(per_class):
            im = rng.integers(lo, lo + 96, size=(8, 8, 3), dtype=np.uint8)
            Image.fromarray(im).save(root / name / f"{i}.png")


def _folder_workdir(tmp_path, data_dir, **flags):
    """config.json of a --dataset=folder run: all probe.py --pixels reads of a workdir."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    cfg = TrainConfig(workdir=str(workdir), dataset="folder", data_dir=str(data_dir),
                      image_size=8, model="N/2", batch_size=8, train_steps=3, **flags)
    (workdir / "config.json").write_text(json.dumps(cfg.to_json()))
    return workdir


def test_probe_refuses_folder_without_held_out_split(tmp_path):
    """With no train/ and test/ subfolders both splits were the whole tree: the probe fit its
    shots and then scored them among its test images."""
    data = tmp_path / "flat"
    _write_classes(data, per_class=5, seed=0)
    proc = run_binary("probe.py", [f"--workdir={_folder_workdir(tmp_path, data)}", "--pixels",
                                   "--shots=2"], check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("probe.py: error: "), lines
    assert f"--data_dir={data}" in lines[0] and "test/" in lines[0], lines


def test_probe_on_folder_with_train_and_test_subfolders(tmp_path):
    from unidiff import data as ud
    from unidiff.eval.probe import select_shots

    data = tmp_path / "split"
    _write_classes(data / "train", per_class=4, seed=0)
    _write_classes(data / "test", per_class=3, seed=1)
    for i in range(3):  # unreadable files among class a's train images
        (data / "train" / "a" / f"broken{i}.png").write_bytes(b"not a png")
    src = ud.build_source("folder", str(data), "train")
    labels = np.asarray([src._labels[i] for i in range(len(src))])
    picks = select_shots(labels, 2, 0)
    assert any(src[int(i)] is None for i in picks)  # the plain pick holds a broken file
    workdir = _folder_workdir(tmp_path, data)
    r = _result(run_binary("probe.py", [f"--workdir={workdir}", "--pixels", "--shots=2"]))
    # 2 readable shots of each of 2 classes from train/ (broken picks replaced within their
    # class); every one of the 6 images of test/.
    assert (r["num_train"], r["num_test"], r["dataset"]) == (4, 6, "folder")
    assert r["top1"] == 1.0  # brightness separates the classes
    capped = _result(run_binary("probe.py", [f"--workdir={workdir}", "--pixels", "--shots=4",
                                             "--max_test=4"]))
    assert (capped["num_train"], capped["num_test"]) == (8, 4)


def test_probe_refuses_overlapping_splits(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    cfg = TrainConfig(workdir=str(workdir), dataset="synthetic", image_size=8, model="N/2",
                      batch_size=8, train_steps=3)
    (workdir / "config.json").write_text(json.dumps(cfg.to_json()))
    for args in (["--train_split=test"], ["--train_split=val"], ["--train_split=all"],
                 ["--test_split=all"]):
        proc = run_binary("probe.py", [f"--workdir={workdir}", "--pixels", *args], check=False)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert len(lines) == 1 and "--train_split/--test_split" in lines[0], (args, lines)


def test_probe_negative_seed_names_seed(tmp_path):
    """--seed=-1 reached numpy's shot selection and came back as '--shots 2: expected
    non-negative integer', naming a flag that was fine."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    cfg = TrainConfig(workdir=str(workdir), dataset="synthetic", image_size=8, model="N/2",
                      batch_size=8, train_steps=3)
    (workdir / "config.json").write_text(json.dumps(cfg.to_json()))
    proc = run_binary("probe.py", [f"--workdir={workdir}", "--pixels", "--shots=2", "--seed=-1"],
                      check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("probe.py: error: --seed"), lines
    assert "--shots" not in lines[0], lines


def test_probe_val_and_test_folders_are_distinct_splits(tmp_path):
    """'val' reads val/ where test/ exists too, so fitting on val and scoring on test
    shares no image and is allowed; on a tree without val/ both names read test/."""
    data = tmp_path / "three"
    _write_classes(data / "train", per_class=2, seed=0)
    _write_classes(data / "val", per_class=3, seed=1)
    _write_classes(data / "test", per_class=4, seed=2)
    workdir = _folder_workdir(tmp_path, data)
    r = _result(run_binary("probe.py", [f"--workdir={workdir}", "--pixels", "--shots=3",
                                        "--train_split=val", "--test_split=test"]))
    assert (r["num_train"], r["num_test"]) == (6, 8)

    (data / "val").rename(tmp_path / "val_moved")
    proc = run_binary("probe.py", [f"--workdir={workdir}", "--pixels", "--shots=3",
                                   "--train_split=val", "--test_split=test"], check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert len(lines) == 1 and "share examples" in lines[0], lines


def test_probe_pixels_of_a_noisy_only_run_report_clean_pixels(tmp_path):
    """--pixels probes the clean pixels: for a run that never saw t = 0 (DiT, r_t0 = 0) the
    auto noise level is 50 for its features, but the JSON of a pixel probe said 50 too."""
    data = tmp_path / "split"
    _write_classes(data / "train", per_class=2, seed=0)
    _write_classes(data / "test", per_class=2, seed=1)
    workdir = _folder_workdir(tmp_path, data, recipe="dit")
    r = _result(run_binary("probe.py", [f"--workdir={workdir}", "--pixels", "--shots=2"]))
    assert r["features"] == "pixels" and r["noise_t"] == 0


def test_probe_pixels_take_an_explicit_noise_t_of_zero(tmp_path):
    """--pixels refuses a --noise_t > 0, and takes 0, the clean level it probes anyway."""
    data = tmp_path / "split"
    _write_classes(data / "train", per_class=2, seed=0)
    _write_classes(data / "test", per_class=2, seed=1)
    workdir = _folder_workdir(tmp_path, data, recipe="dit")
    r = _result(run_binary("probe.py", [f"--workdir={workdir}", "--pixels", "--shots=2", "--noise_t=0"]))
    assert r["features"] == "pixels" and r["noise_t"] == 0
