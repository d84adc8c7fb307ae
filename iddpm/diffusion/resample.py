"""Timestep samplers: which t each training example gets, and its importance weight.

``sample(batch_size, device, generator=None) -> (t int64 (N,), weights float32 (N,))`` draws t with probability
``p = w / sum(w)`` and returns importance weights ``1 / (T * p[t])`` so that the weighted loss stays an unbiased
estimate of the uniform-t objective.  Draws use torch's RNG (``generator``, or torch's global RNG when None;
the original used NumPy's global RNG).  ``state_dict()`` is JSON-serialisable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "ScheduleSampler",
    "UniformSampler",
    "LossAwareSampler",
    "LossSecondMomentResampler",
    "create_named_schedule_sampler",
    "SCHEDULE_SAMPLERS",
]

SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")


def create_named_schedule_sampler(name: str, diffusion) -> ScheduleSampler:
    """``"uniform"`` -> :class:`UniformSampler`, ``"loss-second-moment"`` -> :class:`LossSecondMomentResampler`."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(f"unknown schedule sampler {name!r}; choose one of {', '.join(SCHEDULE_SAMPLERS)}")


class ScheduleSampler(ABC):
    """A distribution over timesteps, meant to reduce the variance of the objective."""

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalised positive weights, float64 (T,)."""

    def sample(
        self, batch_size: int, device="cpu", generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Importance-sample ``batch_size`` timesteps.

        :return: ``(t, weights)``: int64 (N,) indices and float32 (N,) weights ``1 / (T * p[t])``, on ``device``.
        ``generator`` is a CPU torch.Generator (the draw happens on the CPU); None uses torch's global RNG.
        """
        w = self.weights()
        p = w / np.sum(w)
        p_t = torch.from_numpy(p)
        indices = torch.multinomial(p_t, batch_size, replacement=True, generator=generator)
        weights = 1 / (len(p) * p_t[indices])
        return indices.long().to(device), weights.float().to(device)

    def state_dict(self) -> dict:
        """JSON-serialisable state (see :meth:`load_state_dict`)."""
        return {"type": type(self).__name__}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output; ValueError if it belongs to another sampler."""
        if state.get("type") != type(self).__name__:
            raise ValueError(f"sampler state is for {state.get('type')!r}, not {type(self).__name__}")


class UniformSampler(ScheduleSampler):
    """Uniform over 0..T-1 (all weights 1)."""

    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps], dtype=np.float64)

    def weights(self) -> np.ndarray:
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler whose weights follow the training losses it is fed."""

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Update with this rank's (N,) timesteps and losses; when torch.distributed is initialised, every rank's
        batch is all-gathered first (batches padded to the largest size, then trimmed) so that all ranks stay
        identical.  Call it on every rank in the same order."""
        local_ts = local_ts.detach()
        local_losses = local_losses.detach()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self.update_with_all_losses(local_ts.tolist(), local_losses.tolist())
            return
        device = local_ts.device
        world = dist.get_world_size()
        batch_sizes = [torch.zeros(1, dtype=torch.int32, device=device) for _ in range(world)]
        dist.all_gather(batch_sizes, torch.tensor([len(local_ts)], dtype=torch.int32, device=device))
        batch_sizes = [int(x.item()) for x in batch_sizes]
        max_bs = max(batch_sizes)
        pad = max_bs - len(local_ts)
        padded_ts = torch.cat([local_ts, local_ts.new_zeros(pad)])
        padded_losses = torch.cat([local_losses, local_losses.new_zeros(pad)])
        timestep_batches = [torch.zeros_like(padded_ts) for _ in batch_sizes]
        loss_batches = [torch.zeros_like(padded_losses) for _ in batch_sizes]
        dist.all_gather(timestep_batches, padded_ts)
        dist.all_gather(loss_batches, padded_losses)
        timesteps = [x for y, bs in zip(timestep_batches, batch_sizes) for x in y[:bs].tolist()]
        losses = [x for y, bs in zip(loss_batches, batch_sizes) for x in y[:bs].tolist()]
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses) -> None:
        """Update with every rank's timesteps and losses (sequences of ints and floats), in order."""


class LossSecondMomentResampler(LossAwareSampler):
    """Importance sampling by the RMS of recent losses (Nichol & Dhariwal 2021, sec. 3.3).

    Uniform until every t holds ``history_per_term`` losses; then ``w_t = sqrt(mean(history_t^2))``, normalised,
    mixed with ``uniform_prob`` of the uniform distribution.
    """

    def __init__(self, diffusion, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.diffusion = diffusion
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        if self.history_per_term < 1:
            raise ValueError(f"history_per_term must be >= 1, got {history_per_term!r}")
        if not 0.0 <= self.uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob!r}")
        self._loss_history = np.zeros([diffusion.num_timesteps, self.history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses) -> None:
        for t, loss in zip(ts, losses):
            t = int(t)
            if self._loss_counts[t] == self.history_per_term:
                # Shift out the oldest loss term.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())

    def state_dict(self) -> dict:
        return {
            "type": type(self).__name__,
            "history_per_term": self.history_per_term,
            "uniform_prob": self.uniform_prob,
            "loss_history": self._loss_history.tolist(),
            "loss_counts": self._loss_counts.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        history = np.array(state["loss_history"], dtype=np.float64)
        counts = np.array(state["loss_counts"], dtype=np.int64)
        if history.shape != self._loss_history.shape or counts.shape != self._loss_counts.shape:
            raise ValueError(
                f"sampler state has loss history {history.shape}, expected {self._loss_history.shape} "
                "(different number of timesteps or history_per_term)"
            )
        self.uniform_prob = float(state["uniform_prob"])
        self._loss_history = history
        self._loss_counts = counts
