"""FID and Inception Score of a sample ``.npz`` (from sample.py) against reference statistics.

    # once: reference statistics of a dataset split
    python experiments/fid.py --inception_weights=inception_fid.npz \\
        --ref_dataset=digits --ref_split=train --save_stats=digits_train_stats.npz
    # then: FID / IS of samples
    python experiments/fid.py --inception_weights=inception_fid.npz \\
        --samples=workdirs/quickstart_finetune/samples.npz --ref_stats=digits_train_stats.npz

Features are the 2048-d pool features of the FID Inception-v3 (``unidiff.eval.inception``;
images of any size are resized bilinearly to 299x299, one channel repeated to three).
Statistics are float64 streaming mean and covariance; the Inception Score uses the
softmax over the network's 1008 logits without the classifier's bias (as the original IS
code) in ``--is_splits`` chunks.

The weights are NOT downloaded: ``--inception_weights`` is a local ``.npz`` in the format
of ``unidiff/eval/inception.py``, made from the standard FID Inception weights
(pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``) with
``python -m unidiff.eval.convert_inception_weights --input=<pth> --output=<npz>``.

Reference images (``--ref_dataset``) get the evaluation transform (centre crop + resize,
to the samples' size when ``--samples`` is given) and are quantised to uint8 like the
samples. Prints a readable line and one line of JSON (with ``image_size`` of the samples and
``ref_image_size`` when known). Bad input exits with status 2 and a one-line message naming
the flag or file.

Statistics files record the image size and the number of images they were computed from
(``--save_stats``: the reference images' size; ``--save_sample_stats``: the samples' size,
when they are square). FID across image sizes is meaningless (both are resized to 299x299,
but the resize blurs them differently), so ``--ref_stats`` of another size than the
``--samples`` is refused before any Inception work; a file that records no size (an older
fid.py's, or another tool's such as ADM's reference batches) is used with a warning.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zipfile

from absl import app, flags

from unidiff.outputs import check_output_file
from unidiff.runtime import (
    define_compilation_cache_flag, quiet_backend_probe, tune_host_allocator, use_compilation_cache,
)

# Before jax starts its thread pools (unidiff/runtime.py says why).
tune_host_allocator()
quiet_backend_probe()

flags.DEFINE_string("samples", None, "Samples .npz with 'images' uint8 (N, H, W, C) (sample.py).")
flags.DEFINE_string("ref_stats", None, "Reference statistics .npz with 'mu' (D,) and 'sigma' (D, D); "
                    "refused when it records an image size other than the --samples' "
                    "(a file without one is used with a warning).")
flags.DEFINE_string("ref_dataset", None, "Or compute the reference statistics from this dataset "
                    "(a --dataset name of the training binaries).")
flags.DEFINE_string("ref_split", "train", "Split of --ref_dataset.")
flags.DEFINE_string("ref_data_dir", None, "--data_dir of --ref_dataset.")
flags.DEFINE_integer("ref_image_size", 0, "Resize reference images to this size; 0 = the "
                     "samples' size (or the dataset's native size without --samples). With "
                     "--samples, another size than theirs is refused.")
flags.DEFINE_integer("max_ref", 0, "Use this many readable reference images (0 = all; else >= 2): "
                     "a random subset (fixed seed 0, the same on every run), not the first ones, "
                     "which in a class-sorted folder would be the first classes only. "
                     "Unreadable images are skipped and do not count.")
flags.DEFINE_string("inception_weights", None, "Local .npz of FID Inception-v3 weights.")
flags.DEFINE_string("save_stats", None, "Write the reference statistics computed from "
                    "--ref_dataset here (.npz with mu, sigma, and the image_size and "
                    "num_images they are of) for later --ref_stats runs.")
flags.DEFINE_string("save_sample_stats", None, "Write the samples' statistics here (with "
                    "num_images, and image_size when the samples are square).")
flags.DEFINE_integer("batch_size", 50, "Images per Inception call.")
flags.DEFINE_integer("is_splits", 10, "Inception Score splits (capped at the sample count).")
define_compilation_cache_flag()
FLAGS = flags.FLAGS


class UsageError(ValueError):
    """A bad flag; the message names it."""


def load_samples(path: str):
    """``images`` uint8 (N, H, W, C) of a sample.py ``.npz``; UsageError naming the file."""
    import numpy as np

    if not os.path.isfile(path):
        raise UsageError(f"--samples {path}: file not found")
    if not zipfile.is_zipfile(path):
        # np.load would try it as a pickle and say so, which points the wrong way.
        raise UsageError(f"--samples {path}: not an .npz archive; give the .npz that "
                         "sample.py writes beside its --out .png")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UsageError(f"--samples {path}: not a readable .npz ({e})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UsageError(f"--samples {path}: not an .npz archive")
    with data:
        if "images" not in data.files:
            raise UsageError(f"--samples {path}: no 'images' array (found {sorted(data.files)}); "
                             "expected sample.py's output")
        try:
            images = data["images"]
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise UsageError(f"--samples {path}: unreadable 'images' ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UsageError(f"--samples {path}: 'images' must be uint8 (N, H, W, C) with C in "
                         f"{{1, 3}}, got {images.dtype} {images.shape}")
    if images.shape[0] < 2:
        raise UsageError(f"--samples {path}: need at least 2 images for a covariance, got "
                         f"{images.shape[0]}")
    return images


def square_size(images) -> int | None:
    """The side of (N, H, W, C) images when H == W, else None (no single size to record)."""
    return int(images.shape[1]) if images.shape[1] == images.shape[2] else None


def check_ref_size(ref_stats: str, ref_size: int | None, sample_hw: tuple[int, int]) -> str | None:
    """UsageError when --ref_stats records another image size than the samples' (H, W);
    the warning line to print when it records none; None when the sizes agree."""
    h, w = sample_hw
    if ref_size is None:
        return (f"fid.py: warning: --ref_stats {ref_stats} does not record its image size (an "
                f"older fid.py's or another tool's file), so it could not be checked against "
                f"the {h}x{w} --samples; FID across image sizes is meaningless")
    if (h, w) == (ref_size, ref_size):
        return None
    fix = (f"compute reference statistics at the samples' size with --ref_dataset=... "
           f"--ref_image_size={h} --save_stats=... and give that file as --ref_stats"
           if h == w else "reference statistics are of square images, so give square --samples")
    raise UsageError(f"--ref_stats {ref_stats}: statistics of {ref_size}x{ref_size} images, but "
                     f"the --samples are {h}x{w}; FID across image sizes is meaningless (the "
                     f"resize to 299x299 blurs them differently): {fix}")


def reference_images(size: int):
    """Batches of uint8 eval-transformed images of --ref_dataset/--ref_split, how many
    readable images they will hold at most, the split's size, and the image size used."""
    import numpy as np

    from unidiff import data as ud

    try:
        source = ud.build_source(FLAGS.ref_dataset, FLAGS.ref_data_dir, FLAGS.ref_split)
    except ValueError as e:
        raise UsageError(f"--ref_dataset {FLAGS.ref_dataset} --ref_split {FLAGS.ref_split}: {e}") from None
    if getattr(source, "latent", False):
        raise UsageError(f"--ref_dataset {FLAGS.ref_dataset}: latents are not images; FID needs pixels")
    # --max_ref counts images read (readable_examples skips unreadable ones and scans on).
    n = len(source) if not FLAGS.max_ref else min(FLAGS.max_ref, len(source))
    order = ud.subset_order(len(source), n)
    native = getattr(source, "image_shape", None)
    size = size or (native[0] if native else 0)
    if not size:
        raise UsageError(f"--ref_image_size: required for --ref_dataset {FLAGS.ref_dataset} "
                         "(images of varying size) when no --samples are given")

    def batches():
        buf = []
        for _, ex in ud.readable_examples(source, n, order):
            img = ud.eval_image(ex["image"], size)
            buf.append(np.clip(np.round((img + 1.0) * 127.5), 0, 255).astype(np.uint8))
            if len(buf) == FLAGS.batch_size:
                yield np.stack(buf)
                buf = []
        if buf:
            yield np.stack(buf)

    return batches(), n, len(source), size


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every restore at INFO
    import numpy as np

    from unidiff.eval import fid as fid_lib
    from unidiff.eval import inception as inc

    try:
        use_compilation_cache(FLAGS.compilation_cache_dir)
        if not FLAGS.inception_weights:
            raise UsageError(f"--inception_weights: required (a local .npz); {inc.CONVERT_HINT}")
        if not FLAGS.samples and not (FLAGS.ref_dataset and FLAGS.save_stats):
            raise UsageError("--samples: required (sample.py's .npz), unless only computing "
                             "reference statistics with --ref_dataset and --save_stats")
        if FLAGS.ref_stats and FLAGS.ref_dataset:
            raise UsageError("--ref_stats and --ref_dataset: give one of them, not both")
        if FLAGS.samples and not (FLAGS.ref_stats or FLAGS.ref_dataset):
            raise UsageError("--ref_stats: required (a .npz with mu and sigma), or "
                             "--ref_dataset to compute the reference statistics")
        if FLAGS.save_stats and not FLAGS.ref_dataset:
            raise UsageError("--save_stats: saves statistics computed from --ref_dataset; "
                             "give --ref_dataset")
        if FLAGS.save_sample_stats and not FLAGS.samples:
            raise UsageError("--save_sample_stats: saves the statistics of --samples; give --samples")
        inputs = {"samples": FLAGS.samples, "ref_stats": FLAGS.ref_stats,
                  "inception_weights": FLAGS.inception_weights}
        for flag in ("save_stats", "save_sample_stats"):
            if getattr(FLAGS, flag):
                check_output_file(flag, getattr(FLAGS, flag), inputs)  # a ValueError names the flag
        if FLAGS.save_stats and FLAGS.save_sample_stats and (
                os.path.abspath(FLAGS.save_stats) == os.path.abspath(FLAGS.save_sample_stats)):
            raise UsageError("--save_sample_stats: the same file as --save_stats; give two paths")
        if FLAGS.batch_size < 1:
            raise UsageError(f"--batch_size: must be >= 1, got {FLAGS.batch_size}")
        if FLAGS.is_splits < 1:
            raise UsageError(f"--is_splits: must be >= 1, got {FLAGS.is_splits}")
        if FLAGS.ref_image_size < 0:
            raise UsageError(f"--ref_image_size: must be >= 0, got {FLAGS.ref_image_size}")
        if FLAGS.max_ref < 0 or FLAGS.max_ref == 1:
            raise UsageError(f"--max_ref: must be 0 (all) or >= 2 (a covariance needs two "
                             f"images), got {FLAGS.max_ref}")
        samples = load_samples(FLAGS.samples) if FLAGS.samples else None
        ref_mu = ref_sigma = None
        result: dict = {}
        sample_size = None if samples is None else square_size(samples)
        if sample_size is not None:
            result["image_size"] = sample_size
        if FLAGS.ref_stats:
            try:
                ref_file = fid_lib.read_stats(FLAGS.ref_stats)
            except ValueError as e:
                raise UsageError(f"--ref_stats: {e}") from None
            ref_mu, ref_sigma = ref_file.mu, ref_file.sigma
            if ref_mu.shape[0] != inc.POOL_DIM:
                raise UsageError(f"--ref_stats {FLAGS.ref_stats}: mu has {ref_mu.shape[0]} "
                                 f"features, the Inception pool has {inc.POOL_DIM}")
            # Here, before the weights load and Inception compiles: a mismatch is known now.
            warning = check_ref_size(FLAGS.ref_stats, ref_file.image_size, samples.shape[1:3])
            if warning:
                print(warning, file=sys.stderr)
            if ref_file.image_size is not None:
                result["ref_image_size"] = ref_file.image_size
            if ref_file.num_images is not None:
                result["num_ref"] = ref_file.num_images
        ref_batches = None
        if FLAGS.ref_dataset:
            if samples is not None:  # the reference images are made at the samples' size
                h, w = samples.shape[1:3]
                if h != w:
                    raise UsageError(f"--samples {FLAGS.samples}: the images are {h}x{w}, and "
                                     "reference images are square; give square --samples")
                if FLAGS.ref_image_size and FLAGS.ref_image_size != h:
                    raise UsageError(f"--ref_image_size {FLAGS.ref_image_size}: the --samples are "
                                     f"{h}x{w}, and FID across image sizes is meaningless (the "
                                     "resize to 299x299 blurs them differently); leave it 0 (the "
                                     "samples' size)")
            size = FLAGS.ref_image_size or (samples.shape[1] if samples is not None else 0)
            ref_batches, ref_n, ref_total, ref_size = reference_images(size)
            result["ref_image_size"] = ref_size
            if ref_n < 2:
                raise UsageError(f"--ref_dataset {FLAGS.ref_dataset}: need at least 2 images")
        try:
            params = inc.load_inception_params(FLAGS.inception_weights)
        except ValueError as e:
            raise UsageError(f"--inception_weights: {e}") from None
    except ValueError as e:
        print(f"fid.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2

    import jax

    net = inc.make_inception()
    forward = jax.jit(net.apply)
    bsz = FLAGS.batch_size

    def run(batches, want_probs: bool):
        stats, probs = fid_lib.RunningStats(inc.POOL_DIM), []
        for batch in batches:
            real = batch.shape[0]
            if real < bsz:  # one compiled shape for every batch
                batch = np.concatenate([batch, np.zeros((bsz - real,) + batch.shape[1:], batch.dtype)])
            out = forward(params, batch)
            stats.update(np.asarray(out.pool, np.float64)[:real])
            if want_probs:
                probs.append(np.asarray(jax.nn.softmax(out.logits_unbiased.astype(np.float32)), np.float64)[:real])
        return stats, (np.concatenate(probs) if want_probs else None)

    start = time.perf_counter()
    if ref_batches is not None:
        ref, _ = run(ref_batches, want_probs=False)
        if ref.count < 2:  # unreadable images are skipped (the log names them)
            print(f"fid.py: error: --ref_dataset {FLAGS.ref_dataset} --ref_split {FLAGS.ref_split}: "
                  f"{ref.count} of its {ref_total} images could be read, at least 2 are needed",
                  file=sys.stderr)
            return 2
        ref_mu, ref_sigma = ref.mean, ref.cov
        result["num_ref"] = ref.count
        if FLAGS.save_stats:
            fid_lib.save_stats(FLAGS.save_stats, ref_mu, ref_sigma, image_size=ref_size,
                               num_images=ref.count)
            print(f"wrote reference statistics of {ref.count} {FLAGS.ref_dataset}/"
                  f"{FLAGS.ref_split} images to {FLAGS.save_stats}")
    if samples is not None:
        chunks = (samples[i:i + bsz] for i in range(0, samples.shape[0], bsz))
        st, probs = run(chunks, want_probs=True)
        if FLAGS.save_sample_stats:
            fid_lib.save_stats(FLAGS.save_sample_stats, st.mean, st.cov,
                               image_size=sample_size, num_images=st.count)
        fid = fid_lib.frechet_distance(st.mean, st.cov, ref_mu, ref_sigma)
        is_mean, is_std = fid_lib.inception_score(probs, min(FLAGS.is_splits, samples.shape[0]))
        result.update(fid=fid, inception_score=is_mean, inception_score_std=is_std,
                      num_samples=int(samples.shape[0]), samples=FLAGS.samples)
        print(f"FID {fid:.3f}  IS {is_mean:.3f} ± {is_std:.3f}  ({samples.shape[0]} samples, "
              f"{time.perf_counter() - start:.1f}s)")
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    app.run(main)
