"""Training: state, optimizer, the sharded step, orbax checkpoints and the loop."""

from unidiff.train.config import ConfigError, TrainConfig
from unidiff.train.optim import OptimConfig, decay_mask, lr_schedule, make_optimizer
from unidiff.train.state import TrainState, init_state
from unidiff.train.step import (
    StepConfig,
    check_microbatches,
    device_layout,
    make_mesh,
    make_train_step,
    replicate,
    shard_batch,
)

__all__ = [
    "ConfigError", "TrainConfig", "OptimConfig", "decay_mask", "lr_schedule",
    "make_optimizer", "TrainState", "init_state", "StepConfig", "check_microbatches", "device_layout",
    "make_mesh", "make_train_step", "replicate", "shard_batch",
]
