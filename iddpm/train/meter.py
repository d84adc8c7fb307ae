"""Running means of training metrics, including the original's loss-per-quartile-of-t keys."""

from __future__ import annotations

import torch


class MetricMeter:
    """Accumulates means between logging intervals, like the original's ``logger.logkv_mean``.

    :meth:`add_losses` mirrors ``log_loss_dict``: for every loss term ``k`` (``loss``, ``mse``,
    ``vb``, already multiplied by the importance weights) it records the micro-batch mean as ``k``
    and each example's value under ``k_q{quartile}`` with ``quartile = int(4 * t / T)``.
    Accumulation stays on the tensors' device; :meth:`means` synchronises once.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor | float] = {}
        self._counts: dict[str, torch.Tensor | float] = {}

    def add(self, key: str, value, count=1) -> None:
        self._sums[key] = self._sums.get(key, 0.0) + value
        self._counts[key] = self._counts.get(key, 0) + count

    @torch.no_grad()
    def add_losses(self, num_timesteps: int, t: torch.Tensor, losses: dict[str, torch.Tensor]) -> None:
        """``t`` int64 [N] (the diffusion's own indices), ``losses`` {name: float [N]}."""
        quartile = (4 * t // num_timesteps).clamp_(0, 3)
        counts = torch.bincount(quartile, minlength=4).to(torch.float64)
        for key, values in losses.items():
            v = values.detach().to(torch.float64)
            self.add(key, v.mean())
            sums = torch.zeros(4, dtype=torch.float64, device=v.device).index_add_(0, quartile, v)
            self.add(f"{key}_q", sums, counts)

    def totals(self) -> dict[str, tuple[list[float], list[float]]]:
        """``{key: (sums, counts)}`` as Python floats (one entry, or four for ``*_q`` keys); synchronises once."""
        out = {}
        for key, s in self._sums.items():
            c = self._counts[key]
            s = s.tolist() if isinstance(s, torch.Tensor) else s
            c = c.tolist() if isinstance(c, torch.Tensor) else c
            out[key] = (s if isinstance(s, list) else [float(s)], c if isinstance(c, list) else [float(c)])
        return out

    @staticmethod
    def merge(parts: list[dict[str, tuple[list[float], list[float]]]]) -> dict[str, float]:
        """Means over several :meth:`totals` (e.g. one per rank); quartiles that saw no example are left out."""
        sums: dict[str, list[float]] = {}
        counts: dict[str, list[float]] = {}
        for part in parts:
            for key, (s, c) in part.items():
                if key not in sums:
                    sums[key], counts[key] = [0.0] * len(s), [0.0] * len(c)
                sums[key] = [a + b for a, b in zip(sums[key], s)]
                counts[key] = [a + b for a, b in zip(counts[key], c)]
        out: dict[str, float] = {}
        for key in sums:
            if key.endswith("_q"):
                for q, (s, c) in enumerate(zip(sums[key], counts[key])):
                    if c > 0:
                        out[f"{key}{q}"] = s / c
            elif counts[key][0] > 0:
                out[key] = sums[key][0] / counts[key][0]
        return out

    def means(self) -> dict[str, float]:
        """Means since the last :meth:`reset` (quartiles that saw no example are left out)."""
        return self.merge([self.totals()])

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()
