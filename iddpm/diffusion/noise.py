"""Where every random draw of the diffusion comes from.

Each random draw of a sampling loop or of ``calc_bpd_loop`` goes through one :class:`NoiseDraws` object:

- ``generator=None, step_noise=None``: ``torch.randn_like`` on the global RNG, draw for draw what the
  original does;
- ``generator=g``: ``torch.randn(..., generator=g)``, reproducible independently of the global RNG;
- ``step_noise=seq`` (the substitution seam): the k-th draw of the loop *is* ``seq[k]`` (any iterable of
  tensors / arrays shaped like the draw, e.g. a list, or a tensor of shape (K, N, C, H, W) iterated along
  dim 0).  Loop iteration k runs at t = T-1-k and makes exactly one draw (also at t = 0 and with DDIM eta = 0,
  where it is masked out), so ``seq[k]`` is the noise of t = T-1-k.  The start image ``x_T`` is not a draw from
  ``step_noise``; pass it as ``noise=``.

The single-step methods (``p_sample``, ``ddim_sample``, ``q_sample``, ``training_losses``) take the tensor
itself as ``noise=`` instead.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["randn_like", "NoiseDraws"]


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` (same dtype/device); the global RNG when ``generator`` is None."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


class NoiseDraws:
    """Source of the per-step noise of one loop: a generator (or the global RNG) or a given sequence."""

    def __init__(self, generator: torch.Generator | None = None, step_noise: Iterable | None = None):
        if generator is not None and step_noise is not None:
            raise ValueError("pass either generator= or step_noise=, not both")
        self.generator = generator
        self._seq = None if step_noise is None else iter(step_noise)
        self.count = 0

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """The next draw, shaped like ``x`` (same dtype/device)."""
        k = self.count
        self.count += 1
        if self._seq is None:
            return randn_like(x, self.generator)
        try:
            n = next(self._seq)
        except StopIteration:
            raise ValueError(f"step_noise ran out: draw {k} was requested but only {k} were given") from None
        n = torch.as_tensor(n).to(device=x.device, dtype=x.dtype)
        if n.shape != x.shape:
            raise ValueError(f"step_noise[{k}] has shape {tuple(n.shape)}, expected {tuple(x.shape)}")
        return n
