"""experiments/probe.py on tiny workdirs: the JSON result, noise_t auto, bad input."""

import json
import os
import subprocess
import sys

from tests.e2e_helpers import ROOT, run_binary


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


def test_probe_bad_input(tiny_pretrained, tmp_path):
    cases = [
        ([f"--workdir={tiny_pretrained}", "--shots=1000"], "--shots"),
        ([f"--workdir={tiny_pretrained}", "--noise_t=5000"], "--noise_t"),
        ([f"--workdir={tmp_path / 'nope'}"], "--workdir"),
        ([f"--workdir={tiny_pretrained}", "--test_split=bogus"], "--train_split/--test_split"),
        ([f"--workdir={tiny_pretrained}", "--pixels", "--random_init"], "--random_init"),
        ([f"--workdir={tiny_pretrained}", "--pixels", "--l2=nan"], "--l2"),
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
