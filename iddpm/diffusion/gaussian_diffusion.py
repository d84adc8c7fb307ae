"""The Gaussian diffusion process of DDPM / Improved DDPM: forward process, posterior, one reverse step.

Conventions (all methods): images ``x`` are float tensors (N, C, H, W) (any trailing shape works);
timesteps ``t`` are int64 tensors (N,) of indices 0..num_timesteps-1 in this diffusion's own index space.
Tables are float64 NumPy arrays computed once; a lookup indexes the table at ``t`` and casts the values to
``promote_types(float32, x.dtype)`` (float32 for float32/float16/bfloat16 inputs, exactly like the original,
which casts to float32; float64 for float64 inputs) on ``x``'s device.
The model is any callable ``model(x, ts, **model_kwargs) -> (N, C or 2C, ...)``; it receives
``self.model_timesteps(t)``.

Sampling loops live in :mod:`iddpm.diffusion.loops`, training losses and bits/dim in
:mod:`iddpm.diffusion.objectives`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .enums import LossType, ModelMeanType, ModelVarType, coerce_enum
from .loops import SamplingLoopsMixin
from .noise import randn_like
from .objectives import ObjectivesMixin
from .schedules import diffusion_tables

__all__ = ["GaussianDiffusion"]


def _draw_fn(noise: torch.Tensor | None, generator: torch.Generator | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> noise`` (checked to match x's shape) or ``x -> randn_like(x, generator)``."""
    if noise is None:
        return lambda x: randn_like(x, generator)

    def given(x):
        if noise.shape != x.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x.shape)}")
        return noise

    return given


class GaussianDiffusion(SamplingLoopsMixin, ObjectivesMixin):
    """Utilities for training and sampling diffusion models (the original's class, same names and semantics).

    :param betas: 1-D sequence of betas (T >= 2), each in (0, 1].
    :param model_mean_type: what the model's first C channels predict (:class:`ModelMeanType`).
    :param model_var_type: how the variance is obtained (:class:`ModelVarType`).
    :param loss_type: training objective (:class:`LossType`).
    :param rescale_timesteps: pass ``t * 1000 / T`` (float32) to the model instead of the integer ``t``,
        so the model always sees timesteps on the 0..1000 scale.
    Enum arguments also accept member names or int values; anything else raises ValueError.
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps: bool = False):
        self.model_mean_type = coerce_enum(model_mean_type, ModelMeanType, "model_mean_type")
        self.model_var_type = coerce_enum(model_var_type, ModelVarType, "model_var_type")
        self.loss_type = coerce_enum(loss_type, LossType, "loss_type")
        self.rescale_timesteps = bool(rescale_timesteps)
        tables = diffusion_tables(betas)
        for name, arr in tables.items():
            setattr(self, name, arr)
        self.num_timesteps = int(self.betas.shape[0])
        self._device_tables: dict[tuple[str, str], torch.Tensor] = {}

    # ------------------------------------------------------------------ helpers
    def _extract(self, name: str, t: torch.Tensor, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Table ``name`` (float64) at indices ``t`` (N,), cast to ``promote_types(float32, dtype)`` and broadcast
        to ``shape`` on ``t``'s device."""
        device = t.device
        # MPS has no float64: index on the CPU there.
        table_device = torch.device("cpu") if device.type == "mps" else device
        key = (name, str(table_device))
        table = self._device_tables.get(key)
        if table is None:
            table = torch.from_numpy(getattr(self, name)).to(table_device)
            self._device_tables[key] = table
        out_dtype = torch.promote_types(torch.float32, dtype)
        res = table[t.to(table_device)].to(device=device, dtype=out_dtype)
        while res.ndim < len(shape):
            res = res[..., None]
        return res.expand(shape)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """What the model receives for timestep indices ``t``: ``t`` itself (int64), or with
        ``rescale_timesteps`` the float32 product ``float32(t) * float32(1000 / T)``."""
        if self.rescale_timesteps:
            factor = torch.tensor(1000.0 / self.num_timesteps, dtype=torch.float32, device=t.device)
            return t.to(torch.float32) * factor
        return t

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        # The original's name, kept for code that calls it.
        return self.model_timesteps(t)

    def _check_t(self, x: torch.Tensor, t: torch.Tensor) -> None:
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},) (one timestep per example), got {tuple(t.shape)}")

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0), each shaped like ``x_start``."""
        shape, dt = x_start.shape, x_start.dtype
        mean = self._extract("sqrt_alphas_cumprod", t, shape, dt) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, shape, dt)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, shape, dt)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (``noise`` drawn if None)."""
        if noise is None:
            noise = randn_like(x_start, generator)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_start shape {tuple(x_start.shape)}")
        shape, dt = x_start.shape, x_start.dtype
        return (
            self._extract("sqrt_alphas_cumprod", t, shape, dt) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, shape, dt) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0), each shaped like ``x_t``."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} differs from x_t shape {tuple(x_t.shape)}")
        shape, dt = x_t.shape, x_t.dtype
        posterior_mean = (
            self._extract("posterior_mean_coef1", t, shape, dt) * x_start
            + self._extract("posterior_mean_coef2", t, shape, dt) * x_t
        )
        posterior_variance = self._extract("posterior_variance", t, shape, dt)
        posterior_log_variance_clipped = self._extract("posterior_log_variance_clipped", t, shape, dt)
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(
        self,
        model: Callable,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        model_kwargs: dict | None = None,
    ) -> dict:
        """Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        :param clip_denoised: clamp the x_0 prediction to [-1, 1].
        :param denoised_fn: applied to the x_0 prediction before clamping (and before the mean is formed).
        :return: dict of tensors shaped like ``x``: ``mean``, ``variance``, ``log_variance``, ``pred_xstart``.
        """
        if model_kwargs is None:
            model_kwargs = {}
        self._check_t(x, t)
        model_output = model(x, self.model_timesteps(t), **model_kwargs)
        return self._p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)

    def _p_mean_variance_from_output(self, model_output, x, t, clip_denoised=True, denoised_fn=None) -> dict:
        B, C = x.shape[:2]
        shape, dt = x.shape, x.dtype
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape != (B, C * 2, *x.shape[2:]):
                raise ValueError(
                    f"model_var_type {self.model_var_type.name} needs model outputs of shape "
                    f"{(B, C * 2, *x.shape[2:])} (2C channels: mean part and variance part), got "
                    f"{tuple(model_output.shape)}; build the model with learn_sigma=True"
                )
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
                model_variance = torch.exp(model_log_variance)
            else:
                min_log = self._extract("posterior_log_variance_clipped", t, shape, dt)
                max_log = self._extract("log_betas", t, shape, dt)
                # model_var_values in [-1, 1] spans [min_var, max_var] in log space.
                frac = (model_var_values + 1) / 2
                model_log_variance = frac * max_log + (1 - frac) * min_log
                model_variance = torch.exp(model_log_variance)
        else:
            if model_output.shape != x.shape:
                raise ValueError(
                    f"model_var_type {self.model_var_type.name} needs model outputs shaped like x {tuple(x.shape)}, "
                    f"got {tuple(model_output.shape)} (a learn_sigma model needs LEARNED or LEARNED_RANGE)"
                )
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                var_name, log_name = "fixed_large_variance", "fixed_large_log_variance"
            else:
                var_name, log_name = "posterior_variance", "posterior_log_variance_clipped"
            model_variance = self._extract(var_name, t, shape, dt)
            model_log_variance = self._extract(log_name, t, shape, dt)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            if clip_denoised:
                return x0.clamp(-1, 1)
            return x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
            model_mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        shape, dt = x_t.shape, x_t.dtype
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, shape, dt) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, shape, dt) * eps
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        shape, dt = x_t.shape, x_t.dtype
        return (
            self._extract("recip_posterior_mean_coef1", t, shape, dt) * xprev
            - self._extract("posterior_mean_coef2_over_coef1", t, shape, dt) * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        shape, dt = x_t.shape, x_t.dtype
        return (self._extract("sqrt_recip_alphas_cumprod", t, shape, dt) * x_t - pred_xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, shape, dt
        )

    @staticmethod
    def _nonzero_mask(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # 0 where t == 0 (no noise on the last step), as float32 shaped (N, 1, 1, ...).
        return (t != 0).float().view(-1, *([1] * (x.ndim - 1)))

    def p_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        *,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict:
        """One ancestral step x_{t-1} ~ p(x_{t-1} | x_t): ``mean + [t != 0] * exp(0.5 log_variance) * noise``.

        ``noise`` (shaped like x) is drawn after the model call from ``generator`` (global RNG if None) unless
        given.  :return: dict with ``sample`` and ``pred_xstart``.
        """
        return self._p_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, _draw_fn(noise, generator))

    def _p_sample(self, model, x, t, clip_denoised, denoised_fn, model_kwargs, draw) -> dict:
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        noise = draw(x)
        sample = out["mean"] + self._nonzero_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        eta=0.0,
        *,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict:
        """One DDIM step (Song et al. 2021, eq. 12) from x_t to x_{t-1}, eps re-derived from the (clipped) x_0.

        A noise tensor is drawn after the model call (or ``noise`` used) even when ``eta == 0``, like the original.
        :return: dict with ``sample`` and ``pred_xstart``.
        """
        return self._ddim_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, eta, _draw_fn(noise, generator))

    def _ddim_sample(self, model, x, t, clip_denoised, denoised_fn, model_kwargs, eta, draw) -> dict:
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x.shape, x.dtype)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape, x.dtype)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = draw(x)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        sample = mean_pred + self._nonzero_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0
    ) -> dict:
        """One deterministic DDIM step from x_t to x_{t+1} (ODE inversion; abar_next = 0 at t = T-1).

        Only ``eta == 0`` is defined (ValueError otherwise).  :return: dict with ``sample`` and ``pred_xstart``.
        """
        if eta != 0.0:
            raise ValueError(f"ddim_reverse_sample is deterministic: eta must be 0.0, got {eta!r}")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.shape, x.dtype)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_timesteps={self.num_timesteps}, model_mean_type={self.model_mean_type.name}, "
            f"model_var_type={self.model_var_type.name}, loss_type={self.loss_type.name}, "
            f"rescale_timesteps={self.rescale_timesteps})"
        )
