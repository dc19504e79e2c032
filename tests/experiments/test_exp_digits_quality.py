"""experiments/digits_sample_quality.py: real test digits score exactly the classifier's test
accuracy; bad files are rejected."""

import json

import numpy as np
import pytest
from PIL import Image

from tests.e2e_helpers import run_binary
from unidiff import data as ud


def _result(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_real_digits_score_the_test_accuracy(tmp_path):
    src = ud.build_source("digits", None, "test")
    images = np.stack([src[i]["image"] for i in range(len(src))])
    labels = np.asarray([src[i]["label"] for i in range(len(src))], np.int32)
    np.savez(tmp_path / "real.npz", images=images, labels=labels)
    r = _result(run_binary("digits_sample_quality.py", [f"--samples={tmp_path / 'real.npz'}"]))
    # The "samples" are the test split with their true labels: the same number by definition.
    assert r["sample_accuracy"] == r["real_test_accuracy"]
    assert r["real_test_accuracy"] > 0.9  # logistic regression on 16x16 digits
    assert r["num_samples"] == len(src) == 359
    counts = np.bincount(labels, minlength=10)
    weighted = sum(r["per_class"][str(c)] * counts[c] for c in range(10)) / counts.sum()
    assert abs(weighted - r["sample_accuracy"]) < 1e-12

    np.savez(tmp_path / "bad.npz", images=images[:, :8], labels=labels)
    bad = run_binary("digits_sample_quality.py", [f"--samples={tmp_path / 'bad.npz'}"], check=False)
    assert bad.returncode == 2 and "--samples" in bad.stderr and "(N, 16, 16, 1)" in bad.stderr


@pytest.mark.parametrize("kind", ["png", "npy", "empty", "float_labels"])
def test_wrong_file_kinds_get_one_line_naming_samples(tmp_path, kind):
    """The sample.py .png grid was called pickled data, a bare .npy ended in a TypeError
    traceback and an empty .npz in numpy's 'zero-size array' message; float labels were
    accepted and matched no prediction."""
    path = tmp_path / f"s.{kind if kind in ('png', 'npy') else 'npz'}"
    if kind == "png":
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(path)
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros((4, 16, 16, 1), np.uint8))
    elif kind == "empty":
        np.savez(path, images=np.zeros((0, 16, 16, 1), np.uint8), labels=np.zeros((0,), np.int32))
    else:
        np.savez(path, images=np.zeros((4, 16, 16, 1), np.uint8), labels=np.full((4,), 2.5))
    proc = run_binary("digits_sample_quality.py", [f"--samples={path}"], check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"digits_sample_quality.py: error: --samples {path}"), lines
    assert {"empty": "no images", "float_labels": "samples), got float64 (4,)"}.get(
        kind, "not an .npz archive") in lines[0], lines
