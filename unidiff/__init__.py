"""unidiff: a pure-JAX reference implementation of Unified Masked Diffusion (UMD).

Subpackages, one job each:
  corruption  pure corruption functions: schedules, masking, mixing, losses, recipes
  models      stateless Haiku transforms: encoder, side-interpolater, decoder
  data        Grain data sources, transforms and loaders
  train       train state, optimizer, sharded train step, checkpoints, loop
  sampling    DDIM / DDPM samplers with classifier-free guidance
  eval        linear probe, FID and Inception Score
"""

__version__ = "0.1.0"
