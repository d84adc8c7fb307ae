"""Sampling loops (ancestral DDPM and DDIM) over a :class:`~iddpm.diffusion.GaussianDiffusion`.

Loop iteration k runs at t = T-1-k and makes exactly one noise draw (also at t = 0 and for DDIM with eta = 0,
where it is masked out), so that the global RNG advances exactly as in the original.  Draws come from
``generator`` (global RNG when None) or, for substitution, from ``step_noise`` (see :mod:`iddpm.diffusion.noise`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from .noise import NoiseDraws

__all__ = ["SamplingLoopsMixin"]


def _default_device(model, noise) -> torch.device:
    if noise is not None:
        return noise.device
    params = getattr(model, "parameters", None)
    if callable(params):
        try:
            return next(iter(params())).device
        except StopIteration:
            pass
    return torch.device("cpu")


def _last(outputs: Iterator[dict]) -> torch.Tensor:
    final = None
    for final in outputs:  # noqa: B007
        pass
    return final["sample"]


class SamplingLoopsMixin:
    """``p_sample_loop(_progressive)`` and ``ddim_sample_loop(_progressive)``; mixed into GaussianDiffusion."""

    def _loop_start(self, model, shape, noise, device, draws: NoiseDraws):
        if not isinstance(shape, tuple | list):
            raise TypeError(f"shape must be a tuple or list like (N, C, H, W), got {type(shape).__name__}")
        if device is None:
            device = _default_device(model, noise)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
            return noise.to(device)
        return torch.randn(*shape, device=device, generator=draws.generator)

    def _run_loop(self, step, model, shape, noise, device, progress, draws: NoiseDraws) -> Iterator[dict]:
        """Shared body of the progressive loops: ``step(img, t, draw)`` for t = T-1 .. 0, no grad."""
        img = self._loop_start(model, shape, noise, device, draws)
        for i in self._timestep_indices(progress):
            t = torch.tensor([i] * shape[0], device=img.device)
            with torch.no_grad():
                out = step(img, t, draws.like)
                yield out
                img = out["sample"]

    def _timestep_indices(self, progress: bool) -> Iterable[int]:
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            return tqdm(indices)
        return indices

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        *,
        generator: torch.Generator | None = None,
        step_noise: Iterable | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling from x_T to x_0; returns the final sample shaped ``shape``.

        :param noise: x_T (drawn from ``generator`` if None).
        :param device: where to sample (default: ``noise``'s device, else the model's parameters', else CPU).
        :param progress: show a tqdm progress bar.
        :param generator: torch.Generator for every draw (None: the global RNG, like the original).
        :param step_noise: iterable of per-step noise tensors replacing the draws (k-th used at t = T-1-k).
        """
        return _last(
            self.p_sample_loop_progressive(
                model,
                shape,
                noise,
                clip_denoised,
                denoised_fn,
                model_kwargs,
                device,
                progress,
                generator=generator,
                step_noise=step_noise,
            )
        )

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        *,
        generator: torch.Generator | None = None,
        step_noise: Iterable | None = None,
    ) -> Iterator[dict]:
        """Like :meth:`p_sample_loop` but yields each step's ``p_sample`` dict (``sample``, ``pred_xstart``)."""

        def step(img, t, draw):
            return self._p_sample(model, img, t, clip_denoised, denoised_fn, model_kwargs, draw)

        yield from self._run_loop(step, model, shape, noise, device, progress, NoiseDraws(generator, step_noise))

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        *,
        generator: torch.Generator | None = None,
        step_noise: Iterable | None = None,
    ) -> torch.Tensor:
        """DDIM sampling from x_T to x_0 (arguments as :meth:`p_sample_loop`, plus ``eta``)."""
        return _last(
            self.ddim_sample_loop_progressive(
                model,
                shape,
                noise,
                clip_denoised,
                denoised_fn,
                model_kwargs,
                device,
                progress,
                eta,
                generator=generator,
                step_noise=step_noise,
            )
        )

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        *,
        generator: torch.Generator | None = None,
        step_noise: Iterable | None = None,
    ) -> Iterator[dict]:
        """Like :meth:`ddim_sample_loop` but yields each step's ``ddim_sample`` dict."""

        def step(img, t, draw):
            return self._ddim_sample(model, img, t, clip_denoised, denoised_fn, model_kwargs, eta, draw)

        yield from self._run_loop(step, model, shape, noise, device, progress, NoiseDraws(generator, step_noise))
