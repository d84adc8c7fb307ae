"""Few-step samplers: multistep DPM-Solver++ and UniPC as plain functions over any model callable.

Notation (Lu et al. 2022, "DPM-Solver++", sec. 2): ``x_t = alpha_t x_0 + sigma_t eps`` with ``alpha_t =
sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` and ``lambda_t = log(alpha_t / sigma_t)``.  Every solver here is in
data-prediction form: the model output is turned into ``x0 = D(x_t, t)`` (clipped / thresholded like the original's
``pred_xstart``) and the probability-flow ODE is integrated in lambda with the exact solution of its linear part
(DPM-Solver++, the data-prediction form of DPM-Solver's eq. 3.4):

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda x0(lambda) d lambda.

Writing ``h = lambda_t - lambda_s`` and expanding x0 in lambda around lambda_s gives the weights

    I_k(h) = integral_0^h e^(u - h) u^k / k! du,   I_0 = 1 - e^-h,  I_k = h^k / k! - I_(k-1),

so that ``x_t = (sigma_t/sigma_s) x_s + alpha_t sum_k I_k(h) x0^(k)(lambda_s)``; each solver estimates the
derivatives from earlier data predictions (multistep).  Continuous t and the step grids come from
:mod:`iddpm.diffusion.timesteps`.

Grid and output (all solvers): the model is evaluated once at each point of ``solver_timesteps(...)`` (T-1 first,
0 last), so NFE = steps; the returned sample is the **data prediction at t = 0** (after ``denoised_fn``, clipping
or thresholding), i.e. the final step goes from t = 0 to the clean end (abar = 1) at first order.  This is how
the original's DDIM and ancestral loops end (their step from t = 0 returns ``pred_xstart``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .enums import ModelMeanType, ModelVarType
from .noise import randn_like
from .timesteps import SCHEDULES, ContinuousTime, _check_steps, check_choice, solver_timesteps

__all__ = ["SOLVERS", "DEFAULT_SCHEDULE", "LOWER_ORDER_FINAL_BELOW", "SolveResult", "solve"]

SOLVERS: tuple[str, ...] = ("dpm++2m", "dpm++3m", "dpm++2m-sde", "unipc", "ddim-ode")
_ORDER = {"ddim-ode": 1, "dpm++2m": 2, "dpm++3m": 3, "dpm++2m-sde": 2, "unipc": 2}
# Measured (tests/unit/test_solvers.py::test_default_schedules_measured): on closed-form Gaussian-mixture models,
# linear and cosine beta schedules, 10 and 20 NFE, uniform-in-lambda steps gave the smallest geometric-mean error
# for 2M, 3M and UniPC (also Lu et al.'s recommendation for low-resolution pixel models), uniform-in-t steps for
# the first-order solver (the DDIM grid).  The 2M SDE takes 2M's grid: its drift is discretised the same way.
DEFAULT_SCHEDULE: dict[str, str] = {
    "dpm++2m": "logsnr",
    "dpm++3m": "logsnr",
    "dpm++2m-sde": "logsnr",
    "unipc": "logsnr",
    "ddim-ode": "uniform",
}
LOWER_ORDER_FINAL_BELOW = 15  # lower the order of the last steps for fewer steps than this (as DPM-Solver++ advises)
_THRESHOLD_PERCENTILE = 0.995  # Saharia et al. 2022 (Imagen), dynamic thresholding


@dataclass
class SolveResult:
    """``sample``: the final data prediction, shaped like x_T; ``nfe``: model calls made; ``timesteps``: the
    float64 (nfe,) real times at which the model was evaluated (descending)."""

    sample: torch.Tensor
    nfe: int
    timesteps: np.ndarray


def solve(
    model,
    diffusion,
    x_T: torch.Tensor,
    *,
    sampler: str,
    steps: int,
    schedule: str | None = None,
    clip_denoised: bool = True,
    denoised_fn: Callable | None = None,
    model_kwargs: dict | None = None,
    noise_like: Callable[[torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    thresholding: bool = False,
    lower_order_final: bool = True,
) -> SolveResult:
    """Sample from ``x_T`` (noise at t = T-1, any float dtype) with a few-step solver; no gradients are taken.

    :param model: ``model(x[N, C, ...], t[N], **model_kwargs) -> [N, C or 2C, ...]``; ``t`` is real (float32, or
        float64 for float64 x): the solver time t, or ``t * 1000 / T`` with ``diffusion.rescale_timesteps``.
        With a learned variance the channels C: are dropped (the solvers are deterministic in the variance).
    :param diffusion: a :class:`GaussianDiffusion` on the full schedule (a SpacedDiffusion only with the identity
        map); EPSILON or START_X models.
    :param sampler: one of :data:`SOLVERS`: ``"ddim-ode"`` (DPM-Solver++ 1, equal to DDIM eta = 0),
        ``"dpm++2m"`` (DPM-Solver++(2M), Lu et al. 2022, Alg. 2), ``"dpm++3m"`` (third-order multistep from the
        Taylor weights I_0..I_2), ``"dpm++2m-sde"`` (SDE-DPM-Solver++(2M), Lu et al. 2022), ``"unipc"``
        (UniPC-2: predictor UniP-2 and corrector UniC with B(h) = e^h - 1, "bh2", Zhao et al. 2023; order 3).
    :param steps: model evaluations (>= 1); NFE = steps.
    :param schedule: one of :data:`~iddpm.diffusion.timesteps.SCHEDULES`; None: ``DEFAULT_SCHEDULE[sampler]``.
    :param clip_denoised: clamp each data prediction to [-1, 1] (the original's meaning).
    :param denoised_fn: applied to each data prediction before clipping, as in the original.
    :param noise_like: ``noise_like(x)`` -> standard normal noise shaped like x, for the SDE sampler's steps-1
        draws (one per step into t_1..t_(n-1)); default ``torch.randn`` with ``generator``.
    :param callback: called after every model evaluation with ``{"i", "t", "x", "denoised"}`` (grid index, real
        t, the input x, its data prediction).
    :param thresholding: dynamic thresholding of each data prediction (Saharia et al. 2022, percentile 0.995)
        after ``denoised_fn``; the result lies in [-1, 1].
    :param lower_order_final: below :data:`LOWER_ORDER_FINAL_BELOW` steps, cap the order of step j (of n, the
        last being the step to the clean end) at n - j + 1: the final step is first order, the one into t = 0 at
        most second order.
    :return: :class:`SolveResult` with the final data prediction (x dtype and device).
    """
    check_choice(sampler, SOLVERS, "sampler")
    steps = _check_steps(steps)
    schedule = DEFAULT_SCHEDULE[sampler] if schedule is None else check_choice(schedule, SCHEDULES, "schedule")
    _check_diffusion(diffusion)
    ts = solver_timesteps(diffusion.num_timesteps, diffusion.alphas_cumprod, steps, schedule)
    lam, alpha, sigma = ContinuousTime(diffusion.alphas_cumprod).coefficients(ts)
    denoise = _Denoiser(model, diffusion, model_kwargs or {}, clip_denoised, denoised_fn, thresholding, callback)
    grid = _Grid(ts, lam, alpha, sigma, _ORDER[sampler], lower_order_final and steps < LOWER_ORDER_FINAL_BELOW)
    with torch.no_grad():
        if sampler == "unipc":
            sample = _unipc(denoise, x_T, grid)
        else:
            draw = None
            if sampler == "dpm++2m-sde":
                draw = noise_like if noise_like is not None else (lambda x: randn_like(x, generator))
            sample = _dpmpp(denoise, x_T, grid, draw)
    return SolveResult(sample=sample, nfe=denoise.calls, timesteps=ts)


def _check_diffusion(diffusion) -> None:
    timestep_map = getattr(diffusion, "timestep_map", None)
    if timestep_map is not None and list(timestep_map) != list(range(diffusion.original_num_steps)):
        raise ValueError(
            f"the solvers need the full diffusion, got one respaced to {len(timestep_map)} of "
            f"{diffusion.original_num_steps} steps; build it without timestep_respacing (steps= picks the grid)"
        )
    if diffusion.model_mean_type == ModelMeanType.PREVIOUS_X:
        raise ValueError(
            "model_mean_type PREVIOUS_X is not supported by the solvers: such a model predicts the mean of x_(t-1) "
            "for an integer step, which defines no data prediction at real t; use ancestral sampling"
        )


@dataclass(frozen=True)
class _Grid:
    """Per-point float64 coefficients of the evaluation grid and the order rule (see :func:`solve`)."""

    t: np.ndarray
    lam: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    order: int
    lower_final: bool

    def step_order(self, j: int) -> int:
        """Order of the step into point j (1 <= j < n); j data predictions are known then."""
        k = min(self.order, j)
        return min(k, len(self.t) - j + 1) if self.lower_final else k

    def step(self, j: int) -> tuple[float, float, float, float]:
        """``(h, sigma_j / sigma_(j-1), alpha_j, sigma_j)`` of the step from point j-1 into point j."""
        h = float(self.lam[j] - self.lam[j - 1])
        return h, float(self.sigma[j] / self.sigma[j - 1]), float(self.alpha[j]), float(self.sigma[j])


class _Denoiser:
    """The data prediction x0 = D(x, t_j) from one model call, processed like the original's ``pred_xstart``."""

    def __init__(self, model, diffusion, model_kwargs, clip_denoised, denoised_fn, thresholding, callback):
        self.model, self.model_kwargs, self.callback = model, model_kwargs, callback
        self.clip_denoised, self.denoised_fn, self.thresholding = clip_denoised, denoised_fn, thresholding
        self.num_timesteps = diffusion.num_timesteps
        self.rescale = diffusion.rescale_timesteps
        self.learned_var = diffusion.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
        self.predict_x0 = diffusion.model_mean_type == ModelMeanType.START_X
        self.calls = 0

    def __call__(self, x: torch.Tensor, j: int, grid: _Grid) -> torch.Tensor:
        t = float(grid.t[j])
        # The timestep embedding takes real t: the rescale (t * 1000 / T) is applied to the real value.
        t_model = t * 1000.0 / self.num_timesteps if self.rescale else t
        ts = torch.full((x.shape[0],), t_model, dtype=torch.promote_types(torch.float32, x.dtype), device=x.device)
        out = self._mean_channels(self.model(x, ts, **self.model_kwargs), x)
        self.calls += 1
        x0 = out if self.predict_x0 else (x - float(grid.sigma[j]) * out) / float(grid.alpha[j])
        if self.denoised_fn is not None:
            x0 = self.denoised_fn(x0)
        if self.thresholding:
            x0 = _dynamic_threshold(x0)
        if self.clip_denoised:
            x0 = x0.clamp(-1, 1)
        if self.callback is not None:
            self.callback({"i": j, "t": t, "x": x, "denoised": x0})
        return x0

    def _mean_channels(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        want = (n, 2 * c, *x.shape[2:]) if self.learned_var else tuple(x.shape)
        if tuple(out.shape) != want:
            kind = "2C channels (a learned variance)" if self.learned_var else "C channels like x"
            raise ValueError(f"model output has shape {tuple(out.shape)}, expected {want} ({kind})")
        # Deterministic solvers do not use the variance half (channels C:).
        return out[:, :c] if self.learned_var else out


def _dynamic_threshold(x0: torch.Tensor) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022): s = max(1, 99.5th percentile of |x0| per sample); clamp x0 to
    [-s, s] and divide by s (shape and dtype of x0)."""
    flat = x0.reshape(x0.shape[0], -1).abs()
    s = torch.quantile(flat.to(torch.promote_types(torch.float32, flat.dtype)), _THRESHOLD_PERCENTILE, dim=1)
    s = s.clamp(min=1.0).to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def _taylor_weights(h: float, kmax: int) -> list[float]:
    """``[I_0(h), ..., I_kmax(h)]``, ``I_k(h) = integral_0^h e^(u-h) u^k / k! du`` (h > 0)."""
    if h < 1.0:
        # The alternating series I_k = sum_j (-1)^j h^(k+1+j) / (k+1+j)! avoids the cancellation of the
        # recursion at small h (30 terms: the remainder is below h^31 / 31!).
        terms = range(30)
        return [sum((-1) ** i * h ** (k + 1 + i) / math.factorial(k + 1 + i) for i in terms) for k in range(kmax + 1)]
    weights = [-math.expm1(-h)]
    for k in range(1, kmax + 1):
        weights.append(h**k / math.factorial(k) - weights[-1])
    return weights


def _dpmpp(denoise: _Denoiser, x: torch.Tensor, grid: _Grid, draw) -> torch.Tensor:
    """Multistep DPM-Solver++ of order ``grid.order`` (ODE), or the 2M SDE when ``draw`` is given."""
    history: list[tuple[float, torch.Tensor]] = []  # (lambda, data prediction), newest last
    n = len(grid.t)
    for j in range(n):
        m = denoise(x, j, grid)
        history = [*history, (float(grid.lam[j]), m)][-3:]
        if j < n - 1:
            order = grid.step_order(j + 1)
            x = _sde_step(x, history, grid, j + 1, order, draw) if draw else _ode_step(x, history, grid, j + 1, order)
    return m


def _ode_step(x, history, grid: _Grid, j: int, order: int) -> torch.Tensor:
    """x at point j from x at j-1 (the exact linear part plus the Taylor weights); order 1 is the DDIM step."""
    h, ratio, alpha_t, _ = grid.step(j)
    w = _taylor_weights(h, order - 1)
    lam_s, m0 = history[-1]
    if order == 1:
        corr = w[0] * m0
    elif order == 2:
        # DPM-Solver++(2M), Alg. 2: I_1 x0' approximated by I_0 (m0 - m1) / (2 r), r = h_(j-1) / h.
        lam_1, m1 = history[-2]
        r = (lam_s - lam_1) / h
        corr = w[0] * (m0 + (m0 - m1) / (2 * r))
    else:
        d1, d2 = _derivatives(history[-3:])
        corr = w[0] * m0 + w[1] * d1 + w[2] * d2
    return ratio * x + alpha_t * corr


def _derivatives(history) -> tuple[torch.Tensor, torch.Tensor]:
    """dx0/dlambda and d2x0/dlambda2 at the newest point from the quadratic through the last three points
    (Newton divided differences; exact for quadratics, so the 3M step has local error O(h^4))."""
    (l2, m2), (l1, m1), (l0, m0) = history
    h0, h1 = l0 - l1, l1 - l2
    f01, f12 = (m0 - m1) / h0, (m1 - m2) / h1
    f012 = (f01 - f12) / (h0 + h1)
    return f01 + h0 * f012, 2 * f012


def _sde_step(x, history, grid: _Grid, j: int, order: int, draw) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022): the exact linear part of the reverse SDE in lambda,
    x_t = (sigma_t/sigma_s) e^-h x_s + alpha_t (1 - e^-2h) D + sigma_t sqrt(1 - e^-2h) z, with D = m0 (order 1,
    the DDPM posterior step) or m0 + (m0 - m1) / (2 r) (order 2)."""
    h, ratio, alpha_t, sigma_t = grid.step(j)
    lam_s, m0 = history[-1]
    d = m0
    if order >= 2:
        lam_1, m1 = history[-2]
        d = m0 + (m0 - m1) / (2 * (lam_s - lam_1) / h)
    q = -math.expm1(-2 * h)
    return (ratio * math.exp(-h)) * x + (alpha_t * q) * d + (sigma_t * math.sqrt(q)) * draw(x)


def _unipc(denoise: _Denoiser, x: torch.Tensor, grid: _Grid) -> torch.Tensor:
    """UniPC (Zhao et al. 2023), multistep: predictor UniP, then the corrector UniC with the model evaluation at
    the predicted point, which the next step reuses (so NFE = steps).  No corrector after the last point."""
    n = len(grid.t)
    m = denoise(x, 0, grid)
    history = [(float(grid.lam[0]), m)]
    for j in range(1, n):
        order = grid.step_order(j)
        x_pred = _unipc_step(x, history, grid, j, order)
        m = denoise(x_pred, j, grid)
        x = _unipc_step(x, history, grid, j, order, m_new=m) if j < n - 1 else x_pred
        history = [*history, (float(grid.lam[j]), m)][-grid.order :]
    return m


def _unipc_step(x, history, grid: _Grid, j: int, order: int, m_new: torch.Tensor | None = None) -> torch.Tensor:
    """UniP of ``order`` (``m_new`` None; order - 1 earlier predictions) or UniC (``m_new`` = D(x_pred, t_j)).

    With D_m = (x0(lambda_s + r_m h) - x0_s) / r_m, the update is x_t = (sigma_t/sigma_s) x_s + alpha_t I_0 (x0_s
    + sum_m rho_m D_m), with sum_m rho_m r_m^(k-1) = k! I_k / (h^k I_0) for k = 1..p: UniPC's order conditions
    with B(h) = e^h - 1 ("bh2") taken at -h as for data prediction, so that -B = I_0.  Solved exactly, B cancels;
    it matters where a single difference takes rho = 1/2 instead, as the paper does (UniP-2 is then exactly
    DPM-Solver++(2M)).
    """
    h, ratio, alpha_t, _ = grid.step(j)
    lam_s, m0 = history[-1]
    earlier = history[-order:-1][::-1]  # the order - 1 predictions before x0_s, newest first
    rs = [(lam - lam_s) / h for lam, _ in earlier]
    ds = [(m - m0) / r for r, (_, m) in zip(rs, earlier)]
    if m_new is not None:
        rs.append(1.0)
        ds.append(m_new - m0)
    w = _taylor_weights(h, len(rs))
    corr = m0
    if len(rs) == 1:
        corr = m0 + 0.5 * ds[0]
    elif rs:
        g = [math.factorial(k) * w[k] / (h**k * w[0]) for k in range(1, len(rs) + 1)]
        rho = np.linalg.solve(np.array([[r ** (k - 1) for r in rs] for k in range(1, len(rs) + 1)]), np.array(g))
        corr = m0 + sum(float(c) * d for c, d in zip(rho, ds))
    return ratio * x + (alpha_t * w[0]) * corr
