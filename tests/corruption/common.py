"""Shared helpers for the corruption tests: one jitted mix/loss so that test files
reuse each other's compilations (every new static configuration costs an XLA compile)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from unidiff import corruption as uc

T = 50
L, P = 16, 3
SCHEDULES = {kind: uc.make_schedule(kind, T) for kind in ("cosine", "linear")}


# One entry per trace of jit_mix (a Python side effect runs only while tracing).
MIX_TRACES = []


@functools.partial(jax.jit, static_argnums=0, static_argnames="num_clean")
def jit_mix(recipe, schedule, keys, x0, labels=None, num_clean=None):
    MIX_TRACES.append((recipe, x0.shape, num_clean))
    return uc.mix(recipe, schedule, keys, x0, labels, num_clean=num_clean)


@functools.partial(jax.jit, static_argnums=0)
def jit_loss(recipe, schedule, branches, preds):
    return uc.umd_loss(recipe, schedule, branches, preds)


@functools.partial(jax.jit, static_argnums=0)
def jit_loss_grad(recipe, schedule, branches, preds):
    """Gradient of the total loss with respect to the predictions."""
    return jax.grad(lambda pr: uc.umd_loss(recipe, schedule, branches, pr)[0])(preds)


def make_batch(seed, b, l=L, p=P):
    """(keys, x0, labels): one typed key per row, x0 uniform in [-1, 1]."""
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, (b, l, p)).astype(np.float32)
    labels = rng.integers(0, 10, (b,)).astype(np.int32)
    keys = jax.random.split(jax.random.key(seed), b)
    return keys, jnp.asarray(x0), jnp.asarray(labels)
