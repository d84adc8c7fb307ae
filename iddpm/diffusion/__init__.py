"""Gaussian diffusion maths of Improved DDPM (Nichol & Dhariwal 2021) on DDPM (Ho et al. 2020).

Model-agnostic (any ``model(x, t, **model_kwargs)``), numerically identical to OpenAI's ``improved-diffusion``
(same names, so code written for it ports by changing imports).  Extensions: every random draw can take an
explicit ``generator=`` (torch.Generator) and the loops accept ``step_noise=`` to substitute the per-step noise
(see :mod:`iddpm.diffusion.noise`).  Few-step solvers (DPM-Solver++, UniPC) over the same model callable:
:func:`solve` (see :mod:`iddpm.diffusion.solvers`).  Classifier-free guidance is a model wrapper:
:func:`classifier_free_guidance` (see :mod:`iddpm.diffusion.guidance`).
"""

from .enums import LossType, ModelMeanType, ModelVarType
from .factory import create_gaussian_diffusion
from .gaussian_diffusion import GaussianDiffusion
from .guidance import classifier_free_guidance
from .likelihood import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .noise import NoiseDraws, randn_like
from .resample import (
    LossAwareSampler,
    LossSecondMomentResampler,
    ScheduleSampler,
    UniformSampler,
    create_named_schedule_sampler,
)
from .respace import SpacedDiffusion, space_timesteps
from .schedules import betas_for_alpha_bar, diffusion_tables, get_named_beta_schedule
from .solvers import DEFAULT_SCHEDULE, SOLVERS, SolveResult, solve
from .timesteps import SCHEDULES, solver_timesteps

__all__ = [
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "GaussianDiffusion",
    "SpacedDiffusion",
    "space_timesteps",
    "get_named_beta_schedule",
    "betas_for_alpha_bar",
    "diffusion_tables",
    "create_gaussian_diffusion",
    "ScheduleSampler",
    "UniformSampler",
    "LossAwareSampler",
    "LossSecondMomentResampler",
    "create_named_schedule_sampler",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
    "NoiseDraws",
    "randn_like",
    "SOLVERS",
    "SCHEDULES",
    "DEFAULT_SCHEDULE",
    "SolveResult",
    "solve",
    "solver_timesteps",
    "classifier_free_guidance",
]
