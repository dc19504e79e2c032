"""Few-shot linear probe of a workdir's encoder (the UMD paper's big_vision probe).

    python experiments/probe.py --workdir=workdirs/quickstart              # trained encoder
    python experiments/probe.py --workdir=workdirs/quickstart --random_init  # baseline

Features: ``model.represent`` (mean CLS output after the final norm, no mask, null
label) of the dataset's eval-transformed images (centre crop + resize to the training
size), at t = 0, or noised with ``q_sample`` to t = ``--noise_t`` and told that t
(default: 50 for runs trained only on noisy steps, r_t0 = 0: DiT, MaskDiT, MDT; else 0,
including UMD finetuning, r_t0 = 0.05). The closed-form ridge probe (whitening, bias feature, l2 1024)
is fit on ``--shots`` examples per class of ``--train_split`` and scored top-1 on
``--test_split``, which must not share examples with it (a folder or latents dataset
needs a test/ or val/ subfolder of its data_dir). ``--random_init`` probes a freshly
initialised encoder of the same configuration (no checkpoint needed): the baseline a
trained encoder must beat. With
AdaLN-Zero (UMD's blocks start as the identity) and zero-initialised CLS tokens, such an
encoder's representation is the same for every image, so this baseline is at chance;
``--pixels`` probes the flattened raw pixels instead, a model-free reference.

Prints a readable line and then one line of JSON with the result.
"""

from __future__ import annotations

import json
import math
import sys
import time

from absl import app, flags

from unidiff.runtime import (
    define_compilation_cache_flag, quiet_backend_probe, tune_host_allocator, use_compilation_cache,
)

# Before jax starts its thread pools (unidiff/runtime.py says why).
tune_host_allocator()
quiet_backend_probe()

flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
flags.DEFINE_integer("shots", 10, "Train examples per class for the probe (0 = all).")
flags.DEFINE_integer("noise_t", -1, "Time index of the features: 0 = clean, > 0 noised to "
                     "that step; -1 = auto (50 if the run's recipe has r_t0 = 0, else 0). "
                     "--pixels probes clean pixels (0).")
flags.DEFINE_bool("random_init", False, "Probe a randomly initialised encoder of the same "
                  "config instead of the checkpoint (baseline).")
flags.DEFINE_bool("pixels", False, "Probe the raw pixels (flattened eval images) instead of an "
                  "encoder: a model-free reference.")
flags.DEFINE_bool("use_ema", True, "Use the EMA parameters when the checkpoint has them.")
flags.DEFINE_string("train_split", "train", "Split the few-shot examples are drawn from.")
flags.DEFINE_string("test_split", "test", "Held-out split the accuracy is measured on (for "
                    "--dataset=folder or latents: the test/ or val/ subfolder of --data_dir).")
flags.DEFINE_integer("max_test", 0, "Use at most this many readable test examples (0 = all): a "
                     "random subset seeded by --seed, not the first ones (an image folder lists "
                     "its files class by class).")
flags.DEFINE_float("l2", 1024.0, "Ridge penalty.")
flags.DEFINE_integer("seed", 0, "Seed of the shot selection, the noise and --random_init.")
flags.DEFINE_integer("batch_size", 256, "Images per encoder call.")
flags.DEFINE_string("data_dir", None, "Override the workdir's --data_dir.")
define_compilation_cache_flag()
FLAGS = flags.FLAGS


class UsageError(ValueError):
    """A bad flag; the message names it."""


def source_labels(source):
    """All labels of a source; cheap for sources that keep them in memory."""
    import numpy as np

    labels = getattr(source, "_labels", None)
    if labels is not None and len(labels) == len(source):
        return np.asarray(labels, np.int32)
    return np.asarray([int(source[i]["label"]) for i in range(len(source))], np.int32)


def load_examples(examples, image_size: int, latent: bool):
    """Eval-transformed images (float32 [-1, 1]) and labels of readable ``examples``."""
    import numpy as np

    from unidiff import data as ud

    images, labels = [], []
    for ex in examples:
        img = np.asarray(ex["image"], np.float32) if latent else ud.eval_image(ex["image"], image_size)
        images.append(img)
        labels.append(int(ex["label"]))
    return np.stack(images), np.asarray(labels, np.int32)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every restore at INFO
    import jax
    import jax.numpy as jnp
    import numpy as np

    from unidiff import corruption as uc
    from unidiff import data as ud
    from unidiff.eval import probe as probe_lib
    from unidiff.train import workdir as wd

    try:
        use_compilation_cache(FLAGS.compilation_cache_dir)
        trained = wd.load_workdir(FLAGS.workdir, FLAGS.data_dir)
        if FLAGS.shots < 0:
            raise UsageError(f"--shots: must be >= 0 (0 = all), got {FLAGS.shots}")
        if FLAGS.batch_size < 1:
            raise UsageError(f"--batch_size: must be >= 1, got {FLAGS.batch_size}")
        if not 0 <= FLAGS.seed < 2**63 - 1:
            # Negative: numpy's shot selection would refuse it in words naming --shots; the
            # noise key is jax.random.key(seed + 1), an int64.
            raise UsageError(f"--seed: must be in [0, 2**63 - 1), got {FLAGS.seed}")
        if FLAGS.max_test < 0:
            raise UsageError(f"--max_test: must be >= 0, got {FLAGS.max_test}")
        if not (math.isfinite(FLAGS.l2) and FLAGS.l2 >= 0):
            raise UsageError(f"--l2: must be a finite number >= 0, got {FLAGS.l2}")
        num_steps = trained.schedule.num_steps
        noise_t = FLAGS.noise_t if FLAGS.noise_t >= 0 else (50 if trained.noisy_only else 0)
        if FLAGS.noise_t < -1 or noise_t > num_steps:
            raise UsageError(f"--noise_t: must be -1 (auto) or in [0, T = {num_steps}], "
                             f"got {FLAGS.noise_t}")
        if FLAGS.pixels:
            # The raw pixels are probed as they are: a noise level would only be recorded
            # in the JSON (it reported --noise_t, or 50 for a noisy-only run, for clean pixels).
            if FLAGS.noise_t > 0:
                raise UsageError(f"--noise_t {FLAGS.noise_t}: --pixels probes the clean "
                                 "pixels; leave --noise_t unset or 0")
            noise_t = 0
        if trained.dataset_classes < 2:
            raise UsageError(f"--workdir {FLAGS.workdir}: dataset {trained.cfg.dataset} has "
                             f"{trained.dataset_classes} classes; the probe needs labels")
        try:
            # A folder or latents data_dir without a test/ subfolder refuses 'test' here.
            train_src = ud.build_source(trained.cfg.dataset, trained.data_dir, FLAGS.train_split)
            test_src = ud.build_source(trained.cfg.dataset, trained.data_dir, FLAGS.test_split)
        except ValueError as e:
            raise UsageError(f"--train_split/--test_split: {e}") from None
        if ud.splits_share_examples(trained.cfg.dataset, FLAGS.train_split, train_src,
                                    FLAGS.test_split, test_src):
            raise UsageError(f"--train_split/--test_split: {FLAGS.train_split} and "
                             f"{FLAGS.test_split} share examples; the probe must be scored on "
                             "images it was not fit on")
        train_labels = source_labels(train_src)
        read = {}  # index -> example (None: unreadable), each file decoded once

        def readable(i: int) -> bool:
            if i not in read:
                read[i] = train_src[i]
            return read[i] is not None

        if FLAGS.shots:
            try:
                # Unreadable picks are replaced within their class: shots stay equal.
                train_idx = probe_lib.select_shots(train_labels, FLAGS.shots, FLAGS.seed, readable)
            except ValueError as e:
                raise UsageError(f"--shots {FLAGS.shots}: {e}") from None
        else:
            train_idx = np.arange(len(train_src))
        test_n = len(test_src) if not FLAGS.max_test else min(FLAGS.max_test, len(test_src))
        if test_n == 0:
            raise UsageError(f"--test_split {FLAGS.test_split}: no examples")
        # A capped test set is a seeded random subset (class-sorted folders), of images read.
        test_order = ud.subset_order(len(test_src), test_n, FLAGS.seed)
        if FLAGS.random_init and FLAGS.pixels:
            raise UsageError("--random_init and --pixels: pick one baseline")
        if FLAGS.pixels:
            params, step = None, 0
        elif FLAGS.random_init:
            params, step = trained.model.init(jax.random.key(FLAGS.seed)), 0
        else:
            params, step = wd.load_params(trained, FLAGS.use_ema)
    except ValueError as e:
        print(f"probe.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2

    model, schedule = trained.model, trained.schedule
    bsz = FLAGS.batch_size

    @jax.jit
    def features(prm, images, key):
        t = jnp.full((images.shape[0],), noise_t, jnp.int32)
        if noise_t > 0:
            images = uc.q_sample(schedule, images, t, jax.random.normal(key, images.shape))
        return model.represent(prm, images, t)

    def featurize(images, salt: int):
        if FLAGS.pixels:
            return images.reshape(images.shape[0], -1).astype(np.float64)
        out = []
        for i, lo in enumerate(range(0, images.shape[0], bsz)):
            chunk = images[lo:lo + bsz]
            real = chunk.shape[0]
            if real < bsz:  # pad to one compiled shape
                chunk = np.concatenate([chunk, np.zeros((bsz - real,) + chunk.shape[1:], chunk.dtype)])
            key = jax.random.fold_in(jax.random.key(FLAGS.seed + 1), salt * 1_000_003 + i)
            out.append(np.asarray(features(params, jnp.asarray(chunk), key), np.float64)[:real])
        return np.concatenate(out)

    start = time.perf_counter()
    train = (read[int(i)] if int(i) in read else train_src[int(i)] for i in train_idx)
    tr_x, tr_y = load_examples((ex for ex in train if ex is not None), trained.image_size, trained.latent)
    te_x, te_y = load_examples((ex for _, ex in ud.readable_examples(test_src, test_n, test_order)),
                               trained.image_size, trained.latent)
    tr_f, te_f = featurize(tr_x, 0), featurize(te_x, 1)
    try:
        acc = probe_lib.few_shot_probe(tr_f, tr_y, te_f, te_y, l2=FLAGS.l2,
                                       num_classes=trained.dataset_classes)
    except probe_lib.NonFiniteFeaturesError as e:
        source = "the images" if FLAGS.pixels else f"the encoder of {FLAGS.workdir} step {step}"
        print(f"probe.py: error: {e}: {source} gave them (a diverged checkpoint?)", file=sys.stderr)
        return 1
    if FLAGS.pixels:
        what = "raw pixels"
    elif FLAGS.random_init:
        what = f"random-init encoder, features at t = {noise_t}"
    else:
        ema = ", EMA" if FLAGS.use_ema and trained.cfg.ema_decay > 0 else ""
        what = f"step {step}{ema}, features at t = {noise_t}"
    print(f"probe {FLAGS.workdir} ({what}, width {tr_f.shape[1]}): top-1 {100 * acc:.2f}% on "
          f"{len(te_y)} {FLAGS.test_split} images, {FLAGS.shots or 'all'}-shot "
          f"({len(tr_y)} train), {time.perf_counter() - start:.1f}s")
    print(json.dumps({
        "workdir": FLAGS.workdir, "step": int(step), "random_init": bool(FLAGS.random_init),
        "features": "pixels" if FLAGS.pixels else "encoder",
        "top1": acc, "shots": FLAGS.shots, "noise_t": noise_t, "num_train": int(len(tr_y)),
        "num_test": int(len(te_y)), "dataset": trained.cfg.dataset,
    }, sort_keys=True))
    return 0


if __name__ == "__main__":
    app.run(main)
