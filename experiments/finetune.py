"""Finetune a pretrained model for class-conditional generation (UMD §5.2, Table 5).

    python experiments/finetune.py --flagfile=experiments/configs/quickstart_finetune.flags

Starts from the latest checkpoint of a pretraining workdir (``--init_from``; its EMA
parameters if it kept any), adds the label embedding (num_classes + 1 rows, the last
one the null class), and trains with the finetune recipe: r_t0 0.05, m_t0 0.75, m_t 0,
10% label dropout, AdamW b2 0.999, no weight decay, crop area 0.95-1.0, EMA on. The
architecture (model, arch, image size, CLS tokens, side-interpolater position) is
read from the pretraining workdir's config.json, with ``auto`` and ``0`` pinned to what
the pretraining resolved them to. Logging, checkpointing and resume are those of pretrain.py.

``--transfer_to_dit`` instead trains a DiT initialised from the pretraining's encoder as
USP does (USP paper §3-4, ``unidiff.models.encoder_into_dit``): ``--recipe=dit`` on the
``dit_affine`` architecture (DiT with affine LayerNorms, to take the pretrained ones), the
patch embedding and every block copied, the decoder, mask token and CLS tokens dropped,
DiT's AdaLN modulation, embeddings and final layer fresh (gates at zero). The pretraining
needs as many encoder blocks as the DiT variant has blocks: a ``--recipe=usp`` (or
``mae``) run of the same ``--model``, e.g.

    python experiments/finetune.py --init_from=/tmp/usp --transfer_to_dit --recipe=dit \
        --dataset=latents --data_dir=... --workdir=/tmp/usp_dit
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags

from unidiff.runtime import (
    define_compilation_cache_flag, quiet_backend_probe, tune_host_allocator, use_compilation_cache,
)

# Before jax starts its thread pools (unidiff/runtime.py says why).
tune_host_allocator()
quiet_backend_probe()

from unidiff.train import cli
from unidiff.train.config import INHERITED

FINETUNE_DEFAULTS = dict(
    recipe="umd_finetune", class_conditional=True, base_lr=1.5e-4, b2=0.999,
    weight_decay=0.0, ema_decay=0.9999, crop_area_min=0.95, crop_area_max=1.0,
    batch_size=256,
)
cli.define_flags(defaults=FINETUNE_DEFAULTS, skip=INHERITED)  # copied from the pretraining run
cli.define_distributed_flags()
define_compilation_cache_flag()
flags.DEFINE_bool(
    "transfer_to_dit", False,
    "Train a DiT (--arch dit_affine: DiT with affine LayerNorms) initialised from the "
    "pretraining's encoder as USP does: patch embedding and blocks copied, decoder, mask "
    "token and CLS dropped, AdaLN gates at zero. Needs --recipe=dit and a pretraining "
    "(e.g. --recipe=usp) with as many encoder blocks as the DiT has.")
FLAGS = flags.FLAGS
log = logging.getLogger("unidiff")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from unidiff.train import checkpoint as ckpt_lib
    from unidiff.train import loop
    from unidiff.train import workdir as workdir_lib
    from unidiff.train.config import ConfigError

    loop.setup_logging()
    try:
        use_compilation_cache(FLAGS.compilation_cache_dir)
        cli.maybe_initialize_distributed(FLAGS)
        with loop.agreed_preparation() as agreed:  # multi-process: all go on, or none
            if not FLAGS.init_from:
                raise ConfigError("--init_from: required (a pretraining workdir)")
            fixed = workdir_lib.inherited_flags(FLAGS.init_from, FLAGS.recipe, FLAGS.dataset,
                                                FLAGS.data_dir, FLAGS.workdir)
            if FLAGS.transfer_to_dit:
                if FLAGS.recipe != "dit":
                    raise ConfigError(f"--transfer_to_dit: trains a DiT on the DiT objective, so "
                                      f"--recipe must be dit (got {FLAGS.recipe})")
                fixed.update(arch="dit_affine", num_cls_tokens=-1, si_position=None)
            try:
                run = loop.prepare(cli.config_from_flags(FLAGS, **fixed))
            except ConfigError as e:
                # This binary has no flag of that name: the value came from the pretraining.
                if e.flag in INHERITED:
                    copied = ", ".join(f"{k} {v!r}" for k, v in fixed.items())
                    raise ConfigError(f"--init_from {FLAGS.init_from}: the model flags a finetune "
                                      f"copies from its pretraining ({copied}) do not build a "
                                      f"model here: {e}", flag="init_from") from None
                raise
            # A fresh start refuses here a pretraining that cannot fill this model (another
            # channel count, another default since), and a transfer's initialisation reuses
            # the model built for the check (a resume needs neither).
            fresh = ckpt_lib.latest_step(run.cfg.workdir) is None
            source = pretraining_model(run) if FLAGS.transfer_to_dit and fresh else None
            if fresh and not FLAGS.transfer_to_dit:
                workdir_lib.check_finetune_fits(FLAGS.init_from, run.model_config, FLAGS.dataset)
            agreed.cfg = run.cfg
    except (ConfigError, ValueError) as e:
        print(f"finetune.py: error: {e}", file=sys.stderr)
        return 2

    import jax

    def init_params(model, key):
        pretrained, step = ckpt_lib.restore_params(FLAGS.init_from, use_ema=True)
        if FLAGS.transfer_to_dit:
            return transfer_init(model, key, pretrained, step)
        initial = jax.jit(model.init)(key)
        merged, new = ckpt_lib.merge_pretrained(initial, pretrained)
        dropped = ckpt_lib.unused_pretrained(initial, pretrained)
        if dropped:  # e.g. the label table of a class-conditional pretraining
            log.warning("pretrained parameters the finetune's model has no place for, left "
                        "out: %s", ", ".join(dropped))
        # Only the label embedding is new in a finetune; anything else starting fresh
        # means the pretraining built another model than this one.
        unfit = [k for k in new if "label_embed" not in k]
        if unfit:
            raise loop.TrainingError(
                f"--init_from {FLAGS.init_from}: step {step} does not fit the finetune's model: "
                f"{len(unfit)} parameters would start fresh, e.g. {', '.join(unfit[:3])}")
        log.info("initialised from %s step %d; new parameters: %s",
                 FLAGS.init_from, step, ", ".join(new) or "none")
        return merged

    def transfer_init(model, key, pretrained, step):
        from unidiff import models as um

        try:
            # pretraining_model only if the workdir lost its checkpoint since main checked.
            params, copied = um.encoder_into_dit(pretrained, source or pretraining_model(run),
                                                 model.config, jax.jit(model.init)(key))
        except ValueError as e:  # a checkpoint that is not what its config.json says
            raise loop.TrainingError(f"--init_from {FLAGS.init_from}: step {step} cannot "
                                     f"initialise the DiT: {e}") from None
        log.info("initialised the DiT from the encoder of %s step %d: %d parameters copied, "
                 "the AdaLN modulation, embeddings and final layer fresh",
                 FLAGS.init_from, step, len(copied))
        return params

    try:
        loop.train(run, init_params=init_params)
    except loop.TrainingError as e:
        print(f"finetune.py: error: {e}", file=sys.stderr)
        return 1
    return 0


def pretraining_model(run):
    """The ModelConfig that ``--init_from``'s flags build (``auto`` and ``0`` pinned as for
    a finetune of its own architecture), checked to fit the DiT of ``run``; ConfigError
    naming --transfer_to_dit otherwise."""
    import dataclasses

    from unidiff import models as um
    from unidiff.train import loop
    from unidiff.train import workdir as workdir_lib
    from unidiff.train.config import ConfigError

    pre = workdir_lib.inherited_flags(FLAGS.init_from, FLAGS.recipe, FLAGS.dataset, FLAGS.data_dir)
    pre_cfg = dataclasses.replace(run.cfg, **pre)
    recorded = workdir_lib.recorded_model(FLAGS.init_from) or {}
    # The pretraining's own channels (check_transfer then refuses a DiT on other data).
    channels = int(recorded.get("in_channels", run.model_config.in_channels))
    source = loop.model_config_for(pre_cfg, run.image_size, channels, 0)
    workdir_lib.check_finetune_fits(FLAGS.init_from, source, FLAGS.dataset)
    try:
        um.check_transfer(source, run.model_config)
    except ValueError as e:
        raise ConfigError(f"--transfer_to_dit: the encoder of --init_from {FLAGS.init_from} "
                          f"(--arch {pre_cfg.resolved_arch()}, --model {pre_cfg.model}) cannot "
                          f"initialise the DiT: {e}") from None
    return source


if __name__ == "__main__":
    app.run(main)
