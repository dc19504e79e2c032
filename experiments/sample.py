"""Sample images from a trained workdir with DDIM (and classifier-free guidance).

    python experiments/sample.py --workdir=workdirs/quickstart_finetune \\
        --labels=0,1,2,3,4,5,6,7,8,9 --num_samples=100 --guidance=2 \\
        --out=workdirs/quickstart_finetune/samples.png

Rebuilds the model from the workdir's config.json, loads the latest checkpoint (EMA
parameters by default) and runs ``unidiff.sampling.ddim_sample`` (as the UMD code samples: stride
T // steps, then a final x0 step; eta 1 as in UMD finetuning) in batches of
``--batch_size``, one compiled program for all batches. Sample i gets label
``labels[i % len(labels)]``, so in the grid (one column per listed label) every column
holds one class. Writes ``--out`` (a PNG grid, nearest-neighbour enlarged ``--zoom``
times) and, beside it, ``<out>.npz`` with ``images`` uint8 (N, H, W, C) and ``labels``
int32 (N,) (-1 for an unconditional model). A model trained on latents gets no x0
clipping and its npz holds ``latents`` float32 instead (no PNG: decode them first).

Bad flags exit with status 2 and a one-line message naming the flag or file.
"""

from __future__ import annotations

import math
import os
import sys
import time

from absl import app, flags

from unidiff.outputs import atomic_write, check_output_file
from unidiff.runtime import (
    define_compilation_cache_flag, quiet_backend_probe, tune_host_allocator, use_compilation_cache,
)

# Before jax starts its thread pools (unidiff/runtime.py says why).
tune_host_allocator()
quiet_backend_probe()

flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
flags.DEFINE_integer("num_samples", 100, "Number of samples.")
flags.DEFINE_string("labels", "", "Comma-separated class ids, assigned in turn; empty = all "
                    "classes in turn (ignored for unconditional models, which need it empty).")
flags.DEFINE_integer("steps", 125, "DDIM steps (stride T // steps, plus the final x0 step).")
flags.DEFINE_float("eta", 1.0, "DDIM eta: 0 deterministic, 1 as in UMD finetuning.")
flags.DEFINE_float("guidance", 1.0, "Classifier-free guidance scale w >= 0 (1 = none; "
                   "the UMD paper's FIDs use 1.5; pictures often 4). Needs a class-conditional model "
                   "unless 1.")
flags.DEFINE_enum("guidance_schedule", "constant", ["constant", "power_cosine"],
                  "constant w, or MDT's power-cosine ramp from 1 at t = T to w at the last step "
                  "(t = 1).")
flags.DEFINE_float("guidance_power", 4.0, "Exponent of the power-cosine schedule.")
flags.DEFINE_enum("head", "eps", ["eps", "x0"], "Which prediction drives the sampler.")
flags.DEFINE_integer("seed", 0, "Sampling seed (results are deterministic given it and "
                     "--batch_size).")
flags.DEFINE_string("out", None, "Output .png grid; the .npz is written beside it. "
                    "Default <workdir>/samples.png.")
flags.DEFINE_bool("use_ema", True, "Use the EMA parameters when the checkpoint has them.")
flags.DEFINE_integer("batch_size", 250, "Samples per compiled sampler call.")
flags.DEFINE_integer("zoom", 0, "Enlarge the PNG grid this many times (0 = auto: cells of "
                     "at least 64 px).")
flags.DEFINE_string("data_dir", None, "Override the workdir's --data_dir (its dataset is read "
                    "for channels and classes).")
define_compilation_cache_flag()
FLAGS = flags.FLAGS


class UsageError(ValueError):
    """A bad flag; the message names it."""


def parse_labels(text: str, num_classes: int) -> list[int] | None:
    """``--labels`` -> list of class ids (None for an unconditional model)."""
    text = (text or "").strip()
    if num_classes == 0:
        if text:
            raise UsageError("--labels: the model is unconditional (trained without "
                             "class_conditional); leave --labels empty or sample a finetune.py workdir")
        return None
    if not text:
        return list(range(num_classes))
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            label = int(part)
        except ValueError:
            raise UsageError(f"--labels: {part!r} is not an integer class id") from None
        if not 0 <= label < num_classes:
            raise UsageError(f"--labels: class {label} is outside the model's classes "
                             f"0..{num_classes - 1}")
        out.append(label)
    return out


def check_flags(num_classes: int, num_steps: int, has_x0_head: bool, recipe=None) -> None:
    """Every flag against the trained run, before any parameters are read. ``recipe`` is
    the run's ``unidiff.corruption.Recipe`` (None skips the checks that need it)."""
    if recipe is not None and recipe.r_t0 >= 1.0:
        raise UsageError(f"--workdir: recipe {recipe.name} trained only the clean step (r_t0 = 1, "
                         "no noise), so it cannot denoise; finetune it first (finetune.py, or "
                         "--transfer_to_dit for a USP run)")
    if FLAGS.num_samples < 1:
        raise UsageError(f"--num_samples: must be >= 1, got {FLAGS.num_samples}")
    if FLAGS.batch_size < 1:
        raise UsageError(f"--batch_size: must be >= 1, got {FLAGS.batch_size}")
    if not 1 <= FLAGS.steps <= num_steps:
        raise UsageError(f"--steps: must be in [1, T = {num_steps}], got {FLAGS.steps}")
    if not 0.0 <= FLAGS.eta <= 1.0:  # NaN fails too
        raise UsageError(f"--eta: must be in [0, 1] (0 deterministic DDIM, 1 ancestral-like), "
                         f"got {FLAGS.eta}")
    if not (math.isfinite(FLAGS.guidance) and FLAGS.guidance >= 0):
        raise UsageError(f"--guidance: must be a finite number >= 0, got {FLAGS.guidance}")
    if num_classes == 0 and FLAGS.guidance != 1.0:
        raise UsageError(f"--guidance {FLAGS.guidance}: classifier-free guidance needs a "
                         "class-conditional model (finetune.py); use --guidance=1")
    if (num_classes and FLAGS.guidance != 1.0 and recipe is not None
            and not recipe.label_dropout > 0):
        raise UsageError(f"--guidance {FLAGS.guidance}: the run trained with label dropout "
                         f"{recipe.label_dropout}, so its null label never stood in for a class "
                         "on noisy steps and the unconditional prediction is untrained; use "
                         "--guidance=1, or train with --label_dropout > 0")
    if not (math.isfinite(FLAGS.guidance_power) and FLAGS.guidance_power > 0):
        raise UsageError(f"--guidance_power: must be a finite number > 0, got {FLAGS.guidance_power}")
    if FLAGS.head == "x0" and not has_x0_head:
        raise UsageError("--head x0: this model has no x0 head (it predicts eps only); "
                         "use --head=eps")
    if not -2**63 <= FLAGS.seed < 2**63:  # jax.random.key takes an int64
        raise UsageError(f"--seed: must fit in a signed 64-bit integer, got {FLAGS.seed}")
    if FLAGS.zoom < 0:
        raise UsageError(f"--zoom: must be >= 0, got {FLAGS.zoom}")


def output_paths(workdir: str) -> tuple[str, str]:
    out = FLAGS.out or os.path.join(workdir, "samples.png")
    if not out.lower().endswith(".png"):
        raise UsageError(f"--out {out}: expected a path ending in .png")
    npz = out[:-4] + ".npz"
    try:
        check_output_file("out", out)
        check_output_file("out", npz)  # written beside the .png
    except ValueError as e:
        raise UsageError(str(e)) from None
    return out, npz


def to_uint8(images):
    import numpy as np

    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images, ncols: int, zoom: int, pad: int = 1):
    """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, ...) uint8 grid image, zoomed."""
    import numpy as np

    n, h, w, c = images.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    if zoom > 1:
        grid = grid.repeat(zoom, axis=0).repeat(zoom, axis=1)
    return grid


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every restore at INFO
    import jax
    import jax.numpy as jnp
    import numpy as np

    from unidiff import corruption as uc
    from unidiff import sampling as us
    from unidiff.train import workdir as wd

    try:
        use_compilation_cache(FLAGS.compilation_cache_dir)
        trained = wd.load_workdir(FLAGS.workdir, FLAGS.data_dir)
        cfg = trained.model.config
        check_flags(trained.num_classes, trained.schedule.num_steps, cfg.output == "x0_eps",
                    trained.recipe)
        label_list = parse_labels(FLAGS.labels, trained.num_classes)
        out_png, out_npz = output_paths(FLAGS.workdir)
        params, step = wd.load_params(trained, FLAGS.use_ema)
    except ValueError as e:  # ConfigError and UsageError are ValueErrors
        print(f"sample.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2

    model, schedule = trained.model, trained.schedule
    n, bsz = FLAGS.num_samples, min(FLAGS.batch_size, FLAGS.num_samples)
    h = w = trained.image_size
    p = cfg.patch_size
    shape = (bsz, h, w, trained.channels)
    guidance = None
    if label_list is not None and FLAGS.guidance != 1.0:
        guidance = us.GuidanceSpec(FLAGS.guidance, null_label=trained.null_label,
                                   schedule=FLAGS.guidance_schedule, power=FLAGS.guidance_power)
    if label_list is not None:
        labels_all = np.asarray([label_list[i % len(label_list)] for i in range(n)], np.int32)
    else:
        labels_all = np.full((n,), -1, np.int32)
    ema_note = ("EMA" if FLAGS.use_ema and trained.cfg.ema_decay > 0
                else "raw (no EMA in this run)" if FLAGS.use_ema else "raw")
    print(f"sampling {n} from {FLAGS.workdir} step {step} ({ema_note} params): DDIM "
          f"{FLAGS.steps} steps, eta {FLAGS.eta}, head {FLAGS.head}, guidance {FLAGS.guidance} "
          f"({FLAGS.guidance_schedule})", flush=True)

    def denoise(prm, x, t, y):
        pred = model.apply(prm, uc.patchify(x, p), t, y, None)
        x0 = None if pred.x0 is None else uc.unpatchify(pred.x0, p, h, w)
        return x0, uc.unpatchify(pred.eps, p, h, w)

    @jax.jit
    def sample_batch(prm, key, labels):
        return us.ddim_sample(
            lambda x, t, y: denoise(prm, x, t, y), schedule, key, shape, labels,
            steps=FLAGS.steps, eta=FLAGS.eta, head=FLAGS.head, guidance=guidance,
            clip_x0=not trained.latent,  # pixel space only
        )

    root = jax.random.key(FLAGS.seed)
    chunks = []
    start = time.perf_counter()
    for i, lo in enumerate(range(0, n, bsz)):
        real = min(bsz, n - lo)
        # The last batch is padded to the compiled size and trimmed.
        lab = labels_all[lo:lo + real]
        lab = np.concatenate([lab, np.resize(lab, bsz - real)]) if real < bsz else lab
        lab_arg = None if label_list is None else jnp.asarray(lab)
        x = sample_batch(params, jax.random.fold_in(root, i), lab_arg)
        chunks.append(np.asarray(jax.device_get(x), np.float32)[:real])
    samples = np.concatenate(chunks)
    if not np.all(np.isfinite(samples)):
        print("sample.py: error: the sampler produced non-finite values (a diverged "
              "checkpoint?)", file=sys.stderr)
        return 1
    print(f"sampled {n} in {time.perf_counter() - start:.1f}s", flush=True)

    if trained.latent:
        with atomic_write(out_npz) as f:
            np.savez(f, latents=samples, labels=labels_all)
        print(f"wrote {out_npz} (latents: decode them to images before viewing; no PNG)")
        return 0
    images = to_uint8(samples)
    with atomic_write(out_npz) as f:
        np.savez(f, images=images, labels=labels_all)
    from PIL import Image

    ncols = len(label_list) if label_list is not None and len(label_list) > 1 else math.ceil(math.sqrt(n))
    zoom = FLAGS.zoom or max(1, -(-64 // h))
    grid = make_grid(images, ncols, zoom)
    with atomic_write(out_png) as f:
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(f, format="PNG")
    print(f"wrote {out_png} and {out_npz}")
    return 0


if __name__ == "__main__":
    app.run(main)
