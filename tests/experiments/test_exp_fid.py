"""experiments/fid.py: bad input (fast) and an end-to-end run with random Inception weights (slow:
the network always runs at 299x299, about half a minute of compile and compute on 2 cores)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.e2e_helpers import ROOT, run_binary


def _popen(args):
    return subprocess.Popen([sys.executable, str(ROOT / "experiments" / "fid.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _samples(path, n=4, size=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    np.savez(path, images=images, labels=np.zeros(n, np.int32))
    return images


def test_fid_bad_input_names_the_flag_or_file(tmp_path):
    samples = tmp_path / "s.npz"
    _samples(samples)
    no_images = tmp_path / "noimg.npz"
    np.savez(no_images, labels=np.zeros(3))
    bad_stats = tmp_path / "stats.npz"
    np.savez(bad_stats, mu=np.zeros(2048))  # no sigma
    text = tmp_path / "weights.npz"
    text.write_text("not a zip")
    missing = tmp_path / "nope.npz"
    png = tmp_path / "grid.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    good = [f"--samples={samples}", f"--ref_stats={bad_stats}"]
    cases = [
        # (args, substrings the one-line message must contain)
        ([*good[:1], f"--ref_stats={missing}", f"--inception_weights={missing}"],
         ("--ref_stats", "not found")),
        ([*good, f"--inception_weights={missing}"], ("--ref_stats", "sigma")),
        ([f"--samples={no_images}", f"--ref_stats={bad_stats}", f"--inception_weights={missing}"],
         ("--samples", "images")),
        ([f"--samples={samples}", f"--inception_weights={missing}"], ("--ref_stats",)),
        ([f"--samples={samples}", "--ref_dataset=digits", f"--inception_weights={missing}"],
         ("--inception_weights", "not found", "convert_inception_weights")),
        ([f"--samples={samples}", "--ref_dataset=digits", f"--inception_weights={text}"],
         ("--inception_weights", str(text), "convert_inception_weights")),
        # The grid instead of the arrays beside it.
        ([f"--samples={png}", f"--ref_stats={bad_stats}", f"--inception_weights={missing}"],
         ("--samples", "not an .npz archive", "sample.py")),
        ([f"--samples={samples}", "--ref_dataset=digits", "--max_ref=1", f"--inception_weights={missing}"],
         ("--max_ref", ">= 2", "got 1")),
    ]
    folder = tmp_path / "folder.npz"
    folder.mkdir()
    cases += [
        # Outputs are checked before Inception runs; an output over an input is refused.
        ([*good, f"--inception_weights={missing}", f"--save_sample_stats={samples}"],
         ("--save_sample_stats", "--samples", "destroy")),
        ([f"--samples={samples}", "--ref_dataset=digits", f"--inception_weights={missing}",
          f"--save_stats={folder}"], ("--save_stats", "is a folder")),
        (["--ref_dataset=digits", f"--save_stats={tmp_path / 'r.npz'}", f"--inception_weights={missing}",
          f"--save_sample_stats={tmp_path / 'q.npz'}"], ("--save_sample_stats", "--samples")),
    ]
    procs = [_popen(args) for args, _ in cases]
    for (args, expect), proc in zip(cases, procs):
        out, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (args, out, err)
        assert len(lines) == 1 and lines[0].startswith("fid.py: error: "), (args, err)
        for part in expect:
            assert part in lines[0], (args, lines)
    assert "images" in np.load(samples).files  # the samples survived


def _stats(path, **meta):
    # Compressed: an identity (2048, 2048) float64 covariance is 32 MB raw.
    np.savez_compressed(path, mu=np.zeros(2048), sigma=np.eye(2048),
                        **{k: np.int64(v) for k, v in meta.items()})


def test_fid_ref_stats_of_another_image_size_are_refused(tmp_path):
    """The check runs before the weights load (a missing file here) and Inception
    compiles: statistics of 64x64 images against 16x16 samples stop at once."""
    samples, wide = tmp_path / "s.npz", tmp_path / "wide.npz"
    _samples(samples, size=16)
    np.savez(wide, images=np.zeros((4, 16, 24, 3), np.uint8))
    sized = {size: tmp_path / f"ref{size}.npz" for size in (16, 64)}
    for size, path in sized.items():
        _stats(path, image_size=size, num_images=100)
    unsized = tmp_path / "adm_ref.npz"
    _stats(unsized)
    missing = tmp_path / "nope.npz"
    cases = [
        # (samples, reference flags, the warning line's substrings or None, the error's substrings)
        (samples, [f"--ref_stats={sized[64]}"], None,
         ("--ref_stats", str(sized[64]), "64x64", "16x16", "--ref_dataset",
          "--ref_image_size=16", "--save_stats")),
        (wide, [f"--ref_stats={sized[16]}"], None, ("--ref_stats", str(sized[16]), "16x16", "16x24", "square")),
        # Reference statistics computed here, at another size than the samples'.
        (samples, ["--ref_dataset=digits", "--ref_image_size=32"], None,
         ("--ref_image_size 32", "16x16", "leave it 0")),
        (wide, ["--ref_dataset=digits"], None, ("--samples", "16x24", "square")),
        # The sizes agree, or cannot be checked (with a warning): on to the weights.
        (samples, [f"--ref_stats={sized[16]}"], None, ("--inception_weights", "not found")),
        (samples, ["--ref_dataset=digits", "--ref_image_size=16"], None, ("--inception_weights", "not found")),
        (samples, [f"--ref_stats={unsized}"], ("fid.py: warning: ", "--ref_stats", str(unsized),
                                              "does not record its image size", "16x16"),
         ("--inception_weights", "not found")),
    ]
    procs = [_popen([f"--samples={smp}", *ref, f"--inception_weights={missing}"])
             for smp, ref, _, _ in cases]
    for (smp, ref, warning, expect), proc in zip(cases, procs):
        out, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (smp, ref, out, err)
        assert len(lines) == (2 if warning else 1), (smp, ref, err)
        if warning:
            for part in warning:
                assert part in lines[0], (smp, ref, lines)
        assert lines[-1].startswith("fid.py: error: "), (smp, ref, err)
        for part in expect:
            assert part in lines[-1], (smp, ref, lines)


def test_fid_reference_without_two_readable_images_is_one_line(tmp_path):
    """Unreadable reference images are skipped; with fewer than 2 left there is no
    covariance, which used to end in a traceback from the statistics after the pass."""
    from unidiff.eval import inception as inc

    for i in range(3):
        (tmp_path / "ref" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "ref" / "a" / f"x{i}.png").write_bytes(b"not a png")
    weights = tmp_path / "inception_random.npz"
    inc.save_inception_params(weights, inc.random_params(seed=0))
    samples = tmp_path / "s.npz"
    _samples(samples)
    stats = tmp_path / "ref_stats.npz"
    proc = _popen([f"--samples={samples}", "--ref_dataset=folder", f"--ref_data_dir={tmp_path / 'ref'}",
                   f"--inception_weights={weights}", f"--save_stats={stats}"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (out, err)
    assert err.strip().splitlines()[-1] == ("fid.py: error: --ref_dataset folder --ref_split train: "
                                            "0 of its 3 images could be read, at least 2 are needed"), err
    assert "Traceback" not in err and not stats.exists()


@pytest.mark.slow
def test_fid_end_to_end_with_random_weights(tmp_path):
    from unidiff.eval import fid as fid_lib
    from unidiff.eval import inception as inc

    weights = tmp_path / "inception_random.npz"
    inc.save_inception_params(weights, inc.random_params(seed=0))
    samples = tmp_path / "s.npz"
    _samples(samples, n=4, size=16)
    ref = tmp_path / "ref.npz"
    first = run_binary("fid.py", [
        f"--samples={samples}", "--ref_dataset=digits", "--ref_split=test", "--max_ref=5",
        f"--save_stats={ref}", f"--inception_weights={weights}", "--batch_size=3",
        "--is_splits=2",
    ], timeout=900)
    r1 = json.loads(first.stdout.strip().splitlines()[-1])
    assert r1["num_ref"] == 5 and r1["num_samples"] == 4
    assert r1["image_size"] == 16 and r1["ref_image_size"] == 16
    assert np.isfinite(r1["fid"]) and r1["fid"] >= 0
    # IS of a 2-chunk split lies in [1, number of classes].
    assert 1.0 - 1e-9 <= r1["inception_score"] <= inc.NUM_CLASSES
    mu, sigma = fid_lib.load_stats(ref)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    saved = fid_lib.read_stats(ref)  # the reference images' size (the samples') and count
    assert saved.image_size == 16 and saved.num_images == 5
    np.testing.assert_allclose(sigma, sigma.T)

    # Independent check: features in-process, numpy covariance, scipy's sqrtm.
    import jax
    import scipy.linalg

    from unidiff import data as ud

    src = ud.build_source("digits", None, "test")
    refs = np.stack([np.clip(np.round((ud.eval_image(src[i]["image"], 16) + 1) * 127.5), 0, 255)
                     .astype(np.uint8) for i in ud.subset_order(len(src), 5)[:5]])  # --max_ref's subset
    params = inc.load_inception_params(weights)
    apply = jax.jit(inc.make_inception().apply)
    with np.load(samples) as d:
        f_s = np.asarray(apply(params, d["images"]).pool, np.float64)
    f_r = np.asarray(apply(params, refs).pool, np.float64)
    m1, m2 = f_s.mean(0), f_r.mean(0)
    s1, s2 = np.cov(f_s, rowvar=False), np.cov(f_r, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = float(np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert r1["fid"] == pytest.approx(expected, rel=1e-3, abs=1e-3)

    # Against the saved statistics the FID is the same number, with no size warning.
    sample_stats = tmp_path / "sample_stats.npz"
    second = run_binary("fid.py", [f"--samples={samples}", f"--ref_stats={ref}",
                                   f"--inception_weights={weights}", "--batch_size=3",
                                   "--is_splits=2", f"--save_sample_stats={sample_stats}"],
                        timeout=900)
    r2 = json.loads(second.stdout.strip().splitlines()[-1])
    assert r2["fid"] == pytest.approx(r1["fid"], rel=1e-6, abs=1e-6)
    assert r2["image_size"] == 16 and r2["ref_image_size"] == 16 and r2["num_ref"] == 5
    assert "warning" not in second.stderr
    saved = fid_lib.read_stats(sample_stats)
    assert saved.image_size == 16 and saved.num_images == 4
    assert "FID" in second.stdout and "IS" in second.stdout


@pytest.mark.slow
def test_fid_of_non_square_samples_records_no_image_size(tmp_path):
    """16x24 samples have no single size: none in the JSON, none in --save_sample_stats'
    file (whose size a later --ref_stats run checks against its samples)."""
    from unidiff.eval import fid as fid_lib
    from unidiff.eval import inception as inc

    weights = tmp_path / "inception_random.npz"
    inc.save_inception_params(weights, inc.random_params(seed=0))
    wide = tmp_path / "wide.npz"
    rng = np.random.default_rng(0)
    np.savez(wide, images=rng.integers(0, 256, (4, 16, 24, 3), dtype=np.uint8))
    unsized = tmp_path / "adm_ref.npz"
    _stats(unsized)
    sample_stats = tmp_path / "sample_stats.npz"
    proc = run_binary("fid.py", [f"--samples={wide}", f"--ref_stats={unsized}",
                                 f"--inception_weights={weights}", "--batch_size=4", "--is_splits=2",
                                 f"--save_sample_stats={sample_stats}"], timeout=900)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["num_samples"] == 4 and "image_size" not in r and "ref_image_size" not in r, r
    assert "does not record its image size" in proc.stderr and "16x24" in proc.stderr
    saved = fid_lib.read_stats(sample_stats)
    assert saved.image_size is None and saved.num_images == 4
