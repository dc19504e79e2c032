"""Pure-JAX corruption for masked diffusion: schedules, masking, mixing and losses.

Everything here is a plain function of arrays and static Python values (no Haiku, no
global state), so it can be imported into any JAX code::

    from unidiff import corruption as uc

    recipe = uc.recipes.umd()                      # or mae(), dit(), maskdit(), mdt(), ...
    schedule = uc.make_schedule(recipe.schedule, recipe.num_steps)
    x0 = uc.patchify(images, patch_size=4)         # (B, H, W, C) -> (B, L, P)
    keys = jax.random.split(key, x0.shape[0])      # one key per example
    branches = uc.mix(recipe, schedule, keys, x0)  # clean branch + noisy branch
    preds = tuple(my_model(b.x_t, b.t, b.masking) for b in branches)  # -> uc.Prediction
    loss, metrics = uc.umd_loss(recipe, schedule, branches, preds)

Modules: ``schedule`` (diffusion tables with an extra clean step), ``masking`` (MAE
random masking), ``patches`` (image <-> tokens), ``recipes`` (the Recipe value and
presets), ``mixing`` (split_batch, mix), ``losses`` (Prediction, umd_loss).
"""

from unidiff.corruption import recipes
from unidiff.corruption.losses import Prediction, normalize_patches, umd_loss
from unidiff.corruption.masking import (
    Masking,
    gather_tokens,
    no_masking,
    num_kept,
    random_masking,
    unshuffle_tokens,
)
from unidiff.corruption.mixing import Branch, mix, split_batch
from unidiff.corruption.patches import grid_size, patchify, unpatchify
from unidiff.corruption.recipes import Recipe
from unidiff.corruption.schedule import (
    Schedule,
    eps_from_x0,
    make_schedule,
    q_sample,
    x0_from_eps,
)

__all__ = [
    "Branch",
    "Masking",
    "Prediction",
    "Recipe",
    "Schedule",
    "eps_from_x0",
    "gather_tokens",
    "grid_size",
    "make_schedule",
    "mix",
    "no_masking",
    "normalize_patches",
    "num_kept",
    "patchify",
    "q_sample",
    "random_masking",
    "recipes",
    "split_batch",
    "umd_loss",
    "unpatchify",
    "unshuffle_tokens",
    "x0_from_eps",
]
