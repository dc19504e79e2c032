"""absl flags for the training binaries, generated from ``TrainConfig``'s fields.

One flag per field keeps the binaries, the config file format and ``config.json`` in
step; ``config_from_flags`` builds and validates the config before any work starts.
"""

from __future__ import annotations

import dataclasses
import typing

from absl import flags

from unidiff.train.config import TrainConfig

HELP = {
    "workdir": "Directory for checkpoints, config.json and metrics.jsonl; resumes if it has a checkpoint.",
    "recipe": "Corruption recipe: umd, umd_finetune, mae, dit, maskdit, mdt, usp.",
    "arch": "Architecture: auto (by recipe: mae -> umd_no_adaln as in the UMD paper, usp -> mae, "
            "mdt -> mdt, else umd), umd, umd_no_adaln, mae (MAE's ViT and 512x8 decoder; the t = 0 "
            "conditioning rides along as one extra token, which MAE has not), mdt, maskdit "
            "(MaskDiT's), dit (DiT's blocks and embeddings, with UMD's x0 + eps output head), "
            "dit_affine (the same with affine LayerNorms, USP's transfer target).",
    "model": "Model variant size/patch, e.g. N/2, Ti/4, S/4, B/4, L/2, XL/2.",
    "dataset": "digits (embedded, no download), imagenet64, imagenet32, cifar10, folder, latents, synthetic.",
    "data_dir": "Directory with the dataset files (not needed for digits / synthetic).",
    "image_size": "Training resolution; 0 = the dataset's native size.",
    "batch_size": "Global batch size (all devices and processes).",
    "train_steps": "Number of optimizer steps (or use --epochs).",
    "epochs": "Number of epochs (alternative to --train_steps).",
    "base_lr": "Base learning rate; peak LR = base_lr * batch_size / 256.",
    "min_lr": "Final learning rate of the cosine decay.",
    "warmup_steps": "Linear warmup steps; -1 = 5% of the run.",
    "b1": "AdamW beta1.", "b2": "AdamW beta2.",
    "weight_decay": "AdamW weight decay (not on biases, norms, CLS or mask tokens).",
    "grad_clip": "Global-norm gradient clipping; <= 0 disables.",
    "ema_decay": "EMA decay of the parameters; 0 disables EMA.",
    "seed": "Seed for initialisation, data order, augmentation and corruption.",
    "log_every": "Log a progress line and a metrics.jsonl record every N steps.",
    "ckpt_every": "Save a checkpoint every N steps (and at the end, and on SIGTERM).",
    "keep_checkpoints": "How many checkpoints to keep.",
    "compute_dtype": "float32 or bfloat16 (params stay float32).",
    "num_workers": "Grain worker processes for data loading (0 = in-process).",
    "crop_area_min": "Random-resized-crop minimum area fraction.",
    "crop_area_max": "Random-resized-crop maximum area fraction.",
    "flip": "Horizontal flips: auto (on, except digits), true (refused for digits: a "
            "mirrored digit is a different glyph), false.",
    "r_t0": "Override the recipe's fraction of clean (t = 0) examples.",
    "m_t0": "Override the recipe's mask ratio on the clean branch.",
    "m_t": "Override the recipe's mask ratio on the noisy branch.",
    "label_dropout": "Override the recipe's label-dropout probability.",
    "schedule": "Noise schedule: auto (linear for --dataset=latents as in UMD Table 4; "
                "else the recipe's own: cosine, linear for mdt and usp), cosine, linear.",
    "class_conditional": "Condition the model on labels (finetuning).",
    "num_cls_tokens": "CLS tokens in the encoder; -1 = architecture default.",
    "si_position": "MDT's side-interpolater sits before this block of the model's blocks "
                   "(negative counts from the end; --arch mdt only); unset = -2, before the last two.",
    "max_nonfinite": "Stop after this many consecutive steps with a non-finite loss or gradient norm.",
    "num_devices": "Devices on the data mesh; 0 = all.",
    "microbatches": "Accumulate each step's gradient over this many sequential chunks of every "
                    "device's rows (same update, a chunk's activations in memory at a time; on CPU "
                    "chunks of 4-8 rows are also faster). Must divide batch_size / devices.",
    "init_from": "A pretraining workdir to initialise from (finetune).",
    "stop_after": "Run at most this many steps in this process, save and exit 0 (e.g. to fit a "
                  "scheduler's time slice); rerun with the same flags to continue. 0 = to the end.",
}


def _base_type(tp):
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def define_flags(defaults: dict | None = None, skip: tuple[str, ...] = ()) -> None:
    """Define one absl flag per TrainConfig field (optional fields default to None)."""
    defaults = defaults or {}
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name in skip:
            continue
        tp, optional = _base_type(hints[field.name])
        default = defaults.get(field.name, field.default)
        if default is dataclasses.MISSING:
            default = None
        help_ = HELP.get(field.name, field.name)
        define = {str: flags.DEFINE_string, int: flags.DEFINE_integer,
                  float: flags.DEFINE_float, bool: flags.DEFINE_bool}[tp]
        define(field.name, default, help_)


def config_from_flags(FLAGS, **fixed) -> TrainConfig:
    kwargs = {}
    for field in dataclasses.fields(TrainConfig):
        if field.name in fixed:
            kwargs[field.name] = fixed[field.name]
        elif field.name in FLAGS:
            kwargs[field.name] = FLAGS[field.name].value
    cfg = TrainConfig(**kwargs)
    cfg.validate()
    return cfg


def define_distributed_flags() -> None:
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0 for jax.distributed (multi-host); "
                        "unset = single process, or the cluster environment's default.")
    flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
    flags.DEFINE_bool("distributed_auto", False,
                      "Call jax.distributed.initialize() with no arguments, letting JAX read "
                      "the cluster environment (Cloud TPU, SLURM, Open MPI, ...).")


def check_distributed_flags(FLAGS) -> None:
    """ValueError naming the flag unless the distributed flags make sense together."""
    if FLAGS.distributed_auto and (FLAGS.coordinator_address is not None
                                   or FLAGS.num_processes is not None
                                   or FLAGS.process_id is not None):
        raise ValueError("--distributed_auto reads the coordinator, process count and index from "
                         "the cluster environment: drop --coordinator_address/--num_processes/"
                         "--process_id, or --distributed_auto to give them yourself")
    if FLAGS.coordinator_address is None:
        if FLAGS.num_processes is not None or FLAGS.process_id is not None:
            raise ValueError("--num_processes/--process_id need --coordinator_address")
        return
    host, sep, port = FLAGS.coordinator_address.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"--coordinator_address: expected host:port of process 0 (e.g. "
                         f"10.0.0.1:1234), got {FLAGS.coordinator_address!r}")
    if FLAGS.num_processes is None or FLAGS.process_id is None:
        raise ValueError("--coordinator_address needs --num_processes and --process_id")
    if FLAGS.num_processes < 1:
        raise ValueError(f"--num_processes: must be >= 1, got {FLAGS.num_processes}")
    if not 0 <= FLAGS.process_id < FLAGS.num_processes:
        raise ValueError(f"--process_id {FLAGS.process_id} must be in [0, --num_processes "
                         f"{FLAGS.num_processes})")


def maybe_initialize_distributed(FLAGS) -> None:
    import jax

    check_distributed_flags(FLAGS)
    if FLAGS.distributed_auto:
        try:
            jax.distributed.initialize()
        except ValueError as e:  # e.g. no cluster environment to read
            raise ValueError(f"--distributed_auto: {e}") from None
        return
    if FLAGS.coordinator_address is None:
        return
    if jax.config.jax_platforms in (None, "", "cpu"):
        # Cross-process collectives on CPU need gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
