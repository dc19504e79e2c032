"""Samplers for diffusion denoisers: DDIM (respaced, any eta), DDPM, classifier-free guidance.

Model-agnostic: everything takes a ``denoise_fn(x_t, t, labels) -> (x0_pred, eps_pred)``.
"""

from unidiff.sampling.guidance import (
    GUIDANCE_SCHEDULES,
    DenoiseFn,
    GuidanceSpec,
    guidance_weight,
    guided,
)
from unidiff.sampling.samplers import (
    HEADS,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    posterior_variance,
    predict_x0_eps,
)

__all__ = [
    "GUIDANCE_SCHEDULES",
    "HEADS",
    "DenoiseFn",
    "GuidanceSpec",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_sample",
    "guidance_weight",
    "guided",
    "posterior_variance",
    "predict_x0_eps",
]
