"""Continuous time on a discrete-T diffusion, and the step grids of the few-step solvers.

A T-step diffusion defines alpha-bar only at the integer steps t = 0..T-1.  Between them, time is made continuous
by interpolating **log sigma linearly in t**, where ``sigma = sqrt((1 - abar) / abar)`` is the noise-to-signal
ratio (the sigma of Karras et al. 2022 for x / sqrt(abar)) and ``lambda = -log sigma`` is the half log-SNR
of Lu et al. 2022 (DPM-Solver).  At integer t this reproduces the table exactly; in between
the model (whose timestep embedding takes real t) is evaluated at the real t.

All arrays here are NumPy float64.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SCHEDULES", "KARRAS_RHO", "ContinuousTime", "solver_timesteps"]

SCHEDULES: tuple[str, ...] = ("uniform", "logsnr", "karras")
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5


def check_choice(value, choices: tuple[str, ...], arg: str) -> str:
    """``value`` if it is one of ``choices``, else ValueError naming ``arg`` and the choices on one line."""
    if value not in choices:
        raise ValueError(f"{arg}={value!r} is not known; choose one of {', '.join(choices)}")
    return value


class ContinuousTime:
    """log sigma(t), piecewise linear in t over the integer table, and its inverse.

    :param alphas_cumprod: float64 (T,), strictly decreasing in (0, 1) (any diffusion with betas in (0, 1)).
    """

    def __init__(self, alphas_cumprod):
        abar = np.asarray(alphas_cumprod, dtype=np.float64)
        if abar.ndim != 1 or abar.shape[0] < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 2 entries, got shape {abar.shape}")
        if not ((abar > 0).all() and (abar < 1).all() and (np.diff(abar) < 0).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing inside (0, 1) (every beta in (0, 1))")
        self.num_timesteps = int(abar.shape[0])
        self.steps = np.arange(self.num_timesteps, dtype=np.float64)
        # log1p keeps log(1 - abar) accurate where abar is close to 1 (small t).
        self.log_sigma_table = 0.5 * (np.log1p(-abar) - np.log(abar))

    def log_sigma(self, t) -> np.ndarray:
        """log sigma at real t in [0, T-1] (float64, shaped like t)."""
        return np.interp(t, self.steps, self.log_sigma_table)

    def t_of_log_sigma(self, log_sigma) -> np.ndarray:
        """The real t with ``log_sigma(t) == log_sigma`` (clamped to [0, T-1])."""
        return np.interp(log_sigma, self.log_sigma_table, self.steps)

    def coefficients(self, t) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(lam, alpha, sigma_vp)`` at real t: ``x_t = alpha x_0 + sigma_vp eps`` with ``alpha = sqrt(abar)``,
        ``sigma_vp = sqrt(1 - abar)`` and ``lam = log(alpha / sigma_vp)``."""
        ls = self.log_sigma(t)
        alpha = 1.0 / np.sqrt(1.0 + np.exp(2.0 * ls))
        return -ls, alpha, alpha * np.exp(ls)


def solver_timesteps(num_timesteps: int, alphas_cumprod: np.ndarray, steps: int, schedule: str) -> np.ndarray:
    """The real times at which a solver evaluates the model: float64 (steps,), strictly decreasing.

    The first point is T-1 and the last is 0 (for ``steps == 1`` the single point is T-1).  There is one model
    evaluation per point, so NFE = steps; after the last point (t = 0) the solvers finish with the data
    prediction there, i.e. they step on to the clean end (abar = 1, the original's ``alphas_cumprod_prev[0]``),
    exactly as the original's DDIM and ancestral loops end.

    - ``"uniform"``: evenly spaced in t (``np.linspace(T-1, 0, steps)``; integer t when ``steps - 1`` divides
      ``T - 1``, the grid of ``timestep_respacing=str(steps)``);
    - ``"logsnr"``: evenly spaced in lambda = half log-SNR (Lu et al. 2022, the DPM-Solver "logSNR" grid);
    - ``"karras"``: ``sigma_i^(1/rho)`` evenly spaced between the table's sigma_max = sigma(T-1) and
      sigma_min = sigma(0), rho = 7 (Karras et al. 2022, eq. 5).

    Each is mapped back to real t through the log-sigma interpolation of :class:`ContinuousTime`.
    """
    check_choice(schedule, SCHEDULES, "schedule")
    steps = _check_steps(steps)
    ct = ContinuousTime(alphas_cumprod)
    if int(num_timesteps) != ct.num_timesteps:
        raise ValueError(f"num_timesteps={num_timesteps} but alphas_cumprod has {ct.num_timesteps} entries")
    last = float(ct.num_timesteps - 1)
    if steps == 1:
        return np.array([last])
    if schedule == "uniform":
        ts = np.linspace(last, 0.0, steps)
    else:
        ls_max, ls_min = ct.log_sigma_table[-1], ct.log_sigma_table[0]
        if schedule == "logsnr":
            ls = np.linspace(ls_max, ls_min, steps)
        else:
            inv_rho = 1.0 / KARRAS_RHO
            ramp = np.linspace(np.exp(ls_max * inv_rho), np.exp(ls_min * inv_rho), steps)
            ls = KARRAS_RHO * np.log(ramp)
        ts = ct.t_of_log_sigma(ls)
    # The end points are exact by construction; pin them against interpolation round-off.
    ts[0], ts[-1] = last, 0.0
    return ts


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"steps={steps!r}: the number of model evaluations must be an integer >= 1")
    return int(steps)
