"""Pretrain a UMD (or MAE / DiT / MaskDiT / MDT / USP) model.

    python experiments/pretrain.py --flagfile=experiments/configs/quickstart.flags

Every flag is validated against the data, the model and the devices before anything
compiles; a bad flag exits with status 2 and a one-line message naming it. A workdir
with a checkpoint resumes exactly; SIGTERM saves a checkpoint and exits 0.
Multi-host: pass --coordinator_address, --num_processes and --process_id to every process.
"""

from __future__ import annotations

import sys

from absl import app, flags

from unidiff.runtime import (
    define_compilation_cache_flag, quiet_backend_probe, tune_host_allocator, use_compilation_cache,
)

# Before jax starts its thread pools (unidiff/runtime.py says why).
tune_host_allocator()
quiet_backend_probe()

from unidiff.train import cli

cli.define_flags()
cli.define_distributed_flags()
define_compilation_cache_flag()
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from unidiff.train import loop
    from unidiff.train.config import ConfigError

    loop.setup_logging()
    try:
        use_compilation_cache(FLAGS.compilation_cache_dir)
        cli.maybe_initialize_distributed(FLAGS)
        with loop.agreed_preparation() as agreed:  # multi-process: all go on, or none
            run = loop.prepare(cli.config_from_flags(FLAGS))
            agreed.cfg = run.cfg
    except (ConfigError, ValueError) as e:
        print(f"pretrain.py: error: {e}", file=sys.stderr)
        return 2
    try:
        loop.train(run)
    except loop.TrainingError as e:
        print(f"pretrain.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
