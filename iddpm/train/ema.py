"""Exponential moving averages of a model's parameters at one or more rates."""

from __future__ import annotations

import torch


class EMA:
    """Shadow copies of ``model``'s parameters, one set per rate.

    :meth:`update` does, for each rate r, ``ema = r * ema + (1 - r) * param`` (the original's
    ``update_ema``: ``targ.mul_(rate).add_(src, alpha=1 - rate)``), in float32 like the params.
    Buffers are not averaged; :meth:`state_dict` takes them from the live model.
    """

    def __init__(self, model: torch.nn.Module, rates: tuple[float, ...]) -> None:
        self.rates = tuple(float(r) for r in rates)
        self.names = [n for n, _ in model.named_parameters()]
        self.shadows = [[p.detach().clone() for _, p in model.named_parameters()] for _ in self.rates]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = [p.detach() for p in model.parameters()]
        for rate, shadow in zip(self.rates, self.shadows):
            torch._foreach_mul_(shadow, rate)
            torch._foreach_add_(shadow, params, alpha=1.0 - rate)

    def state_dict(self, model: torch.nn.Module, index: int) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the parameters replaced by EMA ``index``'s (detached, not copied)."""
        sd = dict(model.state_dict())
        for name, t in zip(self.names, self.shadows[index]):
            sd[name] = t
        return sd

    @torch.no_grad()
    def load_state_dict(self, index: int, state: dict[str, torch.Tensor]) -> None:
        """Set EMA ``index`` from a model state dict (strict on parameter names)."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[0]!r}")
        for name, t in zip(self.names, self.shadows[index]):
            t.copy_(state[name])

    def copy_to(self, model: torch.nn.Module, index: int) -> None:
        """Load EMA ``index``'s parameters into ``model`` (same architecture; buffers untouched)."""
        with torch.no_grad():
            named = dict(model.named_parameters())
            for name, t in zip(self.names, self.shadows[index]):
                named[name].copy_(t)
