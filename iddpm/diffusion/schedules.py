"""Noise schedules and the float64 tables a Gaussian diffusion precomputes from its betas.

Everything here is NumPy float64 and pure; tensors are made from these tables at use
(see :meth:`iddpm.diffusion.GaussianDiffusion._extract`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = ["get_named_beta_schedule", "betas_for_alpha_bar", "diffusion_tables", "BETA_SCHEDULES"]

BETA_SCHEDULES = ("linear", "cosine")


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas (float64, shape (T,)) of a named schedule.

    - ``"linear"`` (Ho et al. 2020): ``np.linspace(1e-4 * s, 0.02 * s, T)`` with ``s = 1000 / T``, so every T
      has the same shape as the 1000-step schedule (needs T >= 21 so that every beta stays below 1).
    - ``"cosine"`` (Nichol & Dhariwal 2021, eq. 17): alpha-bar(t) = cos((t + 0.008) / 1.008 * pi/2)^2,
      betas clipped at 0.999.
    """
    if not isinstance(num_diffusion_timesteps, int | np.integer) or num_diffusion_timesteps < 1:
        raise ValueError(f"number of diffusion steps must be a positive integer, got {num_diffusion_timesteps!r}")
    if schedule_name == "linear":
        if num_diffusion_timesteps < 21:
            raise ValueError(
                f"the linear schedule needs at least 21 steps (its last beta 0.02 * 1000 / T must stay below 1), "
                f"got {num_diffusion_timesteps}; use more steps or the cosine schedule"
            )
        scale = 1000 / num_diffusion_timesteps
        beta_start = scale * 0.0001
        beta_end = scale * 0.02
        return np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(f"unknown beta schedule {schedule_name!r}; choose one of {', '.join(BETA_SCHEDULES)}")


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Betas (float64, (T,)) discretising a continuous alpha-bar function on t in [0, 1].

    ``beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta)``; only ratios of ``alpha_bar``
    are used, so it need not equal 1 at 0.
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def diffusion_tables(betas) -> dict[str, np.ndarray]:
    """All float64 (T,) tables of a diffusion with these betas, under the original's names.

    Raises ValueError unless betas is 1-D with at least 2 entries, all in (0, 1].
    ``posterior_log_variance_clipped[0]`` is ``log(posterior_variance[1])`` because ``posterior_variance[0] = 0``.
    """
    betas = np.array(betas, dtype=np.float64)
    if betas.ndim != 1:
        raise ValueError(f"betas must be 1-D, got shape {betas.shape}")
    if betas.shape[0] < 2:
        raise ValueError(f"a diffusion needs at least 2 steps, got {betas.shape[0]}")
    if not ((betas > 0).all() and (betas <= 1).all()):
        raise ValueError(f"betas must lie in (0, 1]; got min {betas.min()!r}, max {betas.max()!r}")
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)
    with np.errstate(divide="ignore"):
        log_one_minus_alphas_cumprod = np.log(1.0 - alphas_cumprod)
    fixed_large_variance = np.append(posterior_variance[1], betas[1:])
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "alphas_cumprod_next": alphas_cumprod_next,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": log_one_minus_alphas_cumprod,
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1], posterior_variance[1:])),
        "posterior_mean_coef1": posterior_mean_coef1,
        "posterior_mean_coef2": posterior_mean_coef2,
        # Derived tables the maths indexes (each computed once, in float64, exactly as the original forms them).
        "one_minus_alphas_cumprod": 1.0 - alphas_cumprod,
        "log_betas": np.log(betas),
        "fixed_large_variance": fixed_large_variance,
        "fixed_large_log_variance": np.log(fixed_large_variance),
        "recip_posterior_mean_coef1": 1.0 / posterior_mean_coef1,
        "posterior_mean_coef2_over_coef1": posterior_mean_coef2 / posterior_mean_coef1,
    }
