"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around any class-conditional model callable.

A model trained with label dropout (``--class_dropout P``: each training label replaced by the "no label"
index ``null_label`` with probability P) predicts both the conditional output ``f(x, t, y)`` and the
unconditional one ``f(x, t, null)``.  Guidance with scale W samples with

    eps_guided = eps_uncond + W * (eps_cond - eps_uncond)             (Ho & Salimans 2022, eq. 6 with w = W - 1)

in place of the model's epsilon.  ``W = 1`` is plain conditional sampling, ``W = 0`` unconditional sampling and
``W > 1`` trades diversity for class fidelity.  The wrapper keeps the model-callable seam
``(x[N, C, H, W], t[N], y=[N], **kw) -> [N, C or 2C, H, W]``, so every sampler (ancestral, DDIM, the few-step
solvers) and every respacing wrapper gets guidance without knowing about it.

What is mixed: the **mean channels** of the raw output (the first C of 2C with a learned variance; all C
otherwise), i.e. epsilon for an epsilon-predicting model and x_0 for ``--predict_xstart True``.  Both give the
same guided sample: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) is affine in eps with coefficients that do
not depend on the label, and the mixing weights (1 - W, W) sum to 1, so mixing x_0 predictions is mixing eps
predictions (clipping of x_0, ``clip_denoised``, is applied afterwards to the guided prediction either way).
The learned-variance channels (``learn_sigma``: the interpolation v of eq. 15 of Nichol & Dhariwal) are taken
from the conditional branch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["classifier_free_guidance", "GuidedModel", "NullLabelModel"]


def classifier_free_guidance(model: Callable, scale: float, null_label: int, *, learned_sigma: bool) -> Callable:
    """Wrap ``model`` so that it returns the classifier-free-guided output at guidance scale ``scale`` (W).

    model: ``model(x float[N, C, H, W], t [N], y int64 [N], **kw) -> float[N, C or 2C, H, W]`` trained with label
        dropout (its label embedding has the row ``null_label``).
    scale: W >= 0, finite.  ``W == 1`` returns ``model`` itself (plain conditional sampling, bit for bit);
        ``W == 0`` returns a wrapper that calls the model once with ``y = null_label`` (unconditional sampling,
        mean and learned variance alike); any other W, a :class:`GuidedModel` (one batched forward of 2N per call).
    learned_sigma: whether the output has 2C channels (mean channels first, then the variance channels).
    """
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"guidance scale {scale} must be finite")
    if scale == 1.0:
        return model
    if scale == 0.0:
        return NullLabelModel(model, null_label)
    return GuidedModel(model, scale, null_label, learned_sigma=learned_sigma)


class _Wrapper:
    """Shared plumbing: the wrapped model and its parameters (the loops look for a device there)."""

    def __init__(self, model: Callable, null_label: int):
        self.model = model
        self.null_label = int(null_label)

    def parameters(self):
        params = getattr(self.model, "parameters", None)
        return params() if callable(params) else iter(())

    def _labels(self, y: torch.Tensor | None) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier-free guidance needs the class labels y (a class-conditional model)")
        return y


class NullLabelModel(_Wrapper):
    """``model(x, t, y=null_label, **kw)`` whatever ``y`` is given: the unconditional model (guidance scale 0)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return self.model(x, t, y=torch.full_like(self._labels(y), self.null_label), **kwargs)


class GuidedModel(_Wrapper):
    """The guided model callable of :func:`classifier_free_guidance` for ``W not in (0, 1)``.

    One call runs the network once on 2N inputs: ``[x; x]`` with labels ``[y; null_label]`` (every other tensor
    keyword with a leading dimension N, e.g. ``low_res``, duplicated the same way), then returns
    ``uncond + W * (cond - uncond)`` on the mean channels and ``cond`` on the variance channels.
    """

    def __init__(self, model: Callable, scale: float, null_label: int, *, learned_sigma: bool):
        super().__init__(model, null_label)
        self.scale = float(scale)
        self.learned_sigma = bool(learned_sigma)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """``x`` float [N, C, H, W], ``t`` [N] (or a scalar), ``y`` int64 [N] -> guided output [N, C or 2C, H, W]."""
        y = self._labels(y)
        n, c = x.shape[:2]
        t = t.expand(n) if t.ndim == 0 else t
        twice = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n else v
                 for k, v in kwargs.items()}
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, self.null_label)]),
                         **twice)
        want = 2 * c if self.learned_sigma else c
        if out.shape[0] != 2 * n or out.shape[1] != want:
            raise ValueError(f"model output has shape {tuple(out.shape)} for 2 x {n} inputs of {c} channels; "
                             f"expected {want} channels ({'learned' if self.learned_sigma else 'fixed'} variance)")
        cond, uncond = out[:n], out[n:]
        mean = uncond[:, :c] + self.scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([mean, cond[:, c:]], dim=1) if self.learned_sigma else mean
