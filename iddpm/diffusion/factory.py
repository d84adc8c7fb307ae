"""``create_gaussian_diffusion``: the original's factory, same flag names and keyword defaults."""

from __future__ import annotations

from .enums import LossType, ModelMeanType, ModelVarType
from .respace import SpacedDiffusion, space_timesteps
from .schedules import get_named_beta_schedule

__all__ = ["create_gaussian_diffusion"]


def create_gaussian_diffusion(
    *,
    steps: int = 1000,
    learn_sigma: bool = False,
    sigma_small: bool = False,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    predict_xstart: bool = False,
    rescale_timesteps: bool = False,
    rescale_learned_sigmas: bool = False,
    timestep_respacing: str = "",
) -> SpacedDiffusion:
    """Build the diffusion the original's scripts build: always a :class:`SpacedDiffusion`.

    - ``learn_sigma`` -> LEARNED_RANGE variance, else FIXED_SMALL if ``sigma_small`` else FIXED_LARGE;
    - ``use_kl`` -> RESCALED_KL loss, else RESCALED_MSE if ``rescale_learned_sigmas`` else MSE;
    - ``predict_xstart`` -> START_X mean, else EPSILON;
    - ``timestep_respacing`` "" keeps all ``steps``; otherwise see :func:`space_timesteps`.

    The keyword defaults here are the original factory's.  Note that the original's *scripts*
    (``script_util.model_and_diffusion_defaults``, used by every released checkpoint) default to
    ``rescale_timesteps=True`` and ``rescale_learned_sigmas=True``; pass those to reproduce them
    (``iddpm.config.DiffusionConfig`` uses the script defaults).
    """
    betas = get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    if learn_sigma:
        model_var_type = ModelVarType.LEARNED_RANGE
    elif sigma_small:
        model_var_type = ModelVarType.FIXED_SMALL
    else:
        model_var_type = ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=model_var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )
