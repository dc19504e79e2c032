"""The train state: a NamedTuple pytree that checkpoints as-is.

The RNG is kept as raw key data (uint32) rather than a typed key array so that orbax
can serialise it; ``jax.random.wrap_key_data`` turns it back into a key inside the step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Params = Any


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: number of batches consumed
    params: Params
    opt_state: optax.OptState
    ema_params: Params | None  # None when EMA is off
    rng: jax.Array  # uint32 raw key data
    nonfinite_run: jax.Array  # int32: consecutive skipped (non-finite) steps
    nonfinite_total: jax.Array  # int32: all skipped steps so far


def init_state(
    params: Params, optimizer: optax.GradientTransformation, rng: jax.Array, use_ema: bool
) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
        rng=jax.random.key_data(rng),
        nonfinite_run=jnp.zeros((), jnp.int32),
        nonfinite_total=jnp.zeros((), jnp.int32),
    )
