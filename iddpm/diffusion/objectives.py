"""Training losses and the variational bound in bits/dim; mixed into GaussianDiffusion.

VB terms are per example, in bits per dimension (mean over all non-batch dims of the KL or NLL, / ln 2):
at t = 0 the decoder NLL -log p(x_0 | x_1) of a discretised Gaussian, at t > 0
KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .enums import LossType, ModelMeanType, ModelVarType
from .likelihood import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .noise import NoiseDraws, randn_like

__all__ = ["ObjectivesMixin"]

_LN2 = math.log(2.0)


class ObjectivesMixin:
    """``training_losses``, ``calc_bpd_loop`` and their VB helpers."""

    def _vb_terms_from_output(self, out: dict, x_start, x_t, t) -> torch.Tensor:
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / _LN2
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / _LN2
        # At the first timestep return the decoder NLL, otherwise KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)).
        return torch.where((t == 0), decoder_nll, kl)

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None) -> dict:
        """One VB term per example (bits/dim, (N,)) as ``output``, plus the model's ``pred_xstart``."""
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        return {"output": self._vb_terms_from_output(out, x_start, x_t, t), "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self, model, x_start, t, model_kwargs=None, noise=None, *, generator: torch.Generator | None = None
    ) -> dict:
        """Training losses for one batch, per example.

        :param x_start: (N, C, ...) data in [-1, 1].
        :param t: (N,) int64 timestep indices.
        :param noise: the eps used to form x_t (drawn from ``generator``, or the global RNG, if None).
        :return: dict of (N,) tensors: ``loss`` always; ``mse`` for MSE / RESCALED_MSE; ``vb`` as well when the
            variance is learned (hybrid loss: vb sees the mean output detached, and is multiplied by
            T/1000 under RESCALED_MSE).  KL gives the VB term, RESCALED_KL the VB term * T.
        """
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = randn_like(x_start, generator)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}
        if self.loss_type in (LossType.KL, LossType.RESCALED_KL):
            terms["loss"] = self._vb_terms_bpd(
                model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] *= self.num_timesteps
            return terms

        self._check_t(x_t, t)
        model_output = model(x_t, self.model_timesteps(t), **model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            B, C = x_t.shape[:2]
            if model_output.shape != (B, C * 2, *x_t.shape[2:]):
                raise ValueError(
                    f"model_var_type {self.model_var_type.name} needs model outputs of shape "
                    f"{(B, C * 2, *x_t.shape[2:])}, got {tuple(model_output.shape)}; build the model with "
                    "learn_sigma=True"
                )
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            # Learn the variance with the variational bound, but don't let it affect the mean prediction.
            frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
            out = self._p_mean_variance_from_output(frozen_out, x_t, t, clip_denoised=False)
            terms["vb"] = self._vb_terms_from_output(out, x_start, x_t, t)
            if self.loss_type == LossType.RESCALED_MSE:
                # Divide by 1000 for equivalence with the initial implementation; without it the vb term
                # would hurt the MSE term.
                terms["vb"] *= self.num_timesteps / 1000.0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        if not model_output.shape == target.shape == x_start.shape:
            raise ValueError(
                f"model output mean part {tuple(model_output.shape)} must be shaped like x_start {tuple(x_start.shape)}"
            )
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_{T-1} | x_0) || N(0, I)) in bits/dim, (N,); independent of the model."""
        batch_size = x_start.shape[0]
        t = torch.tensor([self.num_timesteps - 1] * batch_size, device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / _LN2

    def calc_bpd_loop(
        self,
        model,
        x_start,
        clip_denoised=True,
        model_kwargs=None,
        *,
        generator: torch.Generator | None = None,
        step_noise: Iterable | None = None,
        progress: bool = False,
    ) -> dict:
        """The full variational bound in bits/dim, with its per-timestep terms.

        Runs t = T-1 .. 0, drawing fresh noise for x_t at every step (``generator`` / global RNG, or
        ``step_noise``: k-th item used at t = T-1-k).
        :return: dict with ``total_bpd`` (N,) = sum of ``vb`` row + ``prior_bpd`` (N,); ``vb``, ``xstart_mse``,
            ``mse`` (N, T) in loop order: column k is t = T-1-k (the last column is the t = 0 decoder term).
            ``mse`` is the eps MSE with eps re-derived from the (clipped) x_0 prediction.
        """
        device = x_start.device
        batch_size = x_start.shape[0]
        draws = NoiseDraws(generator, step_noise)
        vb, xstart_mse, mse = [], [], []
        for t in self._timestep_indices(progress):
            t_batch = torch.tensor([t] * batch_size, device=device)
            noise = draws.like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(
                    model, x_start=x_start, x_t=x_t, t=t_batch, clip_denoised=clip_denoised, model_kwargs=model_kwargs
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb = torch.stack(vb, dim=1)
        xstart_mse = torch.stack(xstart_mse, dim=1)
        mse = torch.stack(mse, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        total_bpd = vb.sum(dim=1) + prior_bpd
        return {"total_bpd": total_bpd, "prior_bpd": prior_bpd, "vb": vb, "xstart_mse": xstart_mse, "mse": mse}
