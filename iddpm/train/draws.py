"""Per-example training randomness: timestep, importance weight and noise of each example.

Example ``i`` of optimizer step ``s`` (``i`` = its position in the *global* batch) draws its timestep
(through the schedule sampler) and then its noise from one CPU generator seeded with
``example_seed(seed, s, i)``.  The draws therefore do not depend on the micro-batch size, the
number of ranks or the device, and resuming at step ``s`` needs no generator state.
With the loader's interleaved sharding, rank ``r`` of ``W`` holds global positions ``r + W * j``.

Label dropout (classifier-free guidance, ``--class_dropout P``) is drawn the same way, from a sibling stream
keyed by the same ``(seed, step, position)`` (:func:`label_dropout_mask`), so that it leaves the timestep and
noise draws untouched and, like them, survives resume and any split over micro-batches and ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from iddpm.runtime.seeding import example_seed

_LABEL_DROPOUT_TAG = 0xC1A55  # keys the label-dropout stream apart from the timestep/noise stream


def global_positions(local_batch: int, rank: int, world_size: int) -> list[int]:
    """Positions in the global batch of this rank's ``local_batch`` examples (``DistributedSampler`` interleaving)."""
    return [rank + world_size * j for j in range(local_batch)]


def example_draws(sampler, seed: int, step: int, positions: Sequence[int], shape: Sequence[int],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t int64 [n], weights float32 [n], noise float32 [n, *shape])`` on ``device`` for the given positions."""
    ts, ws, noise = [], [], []
    g = torch.Generator()
    for i in positions:
        g.manual_seed(example_seed(seed, step, int(i)))
        t, w = sampler.sample(1, "cpu", generator=g)
        ts.append(t)
        ws.append(w)
        noise.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32))
    return torch.cat(ts).to(device), torch.cat(ws).to(device), torch.stack(noise).to(device)


def label_dropout_mask(seed: int, step: int, positions: Sequence[int], p: float) -> torch.Tensor:
    """bool ``[n]``: which of the examples at global ``positions`` of step ``step`` lose their label.

    Example ``i`` is dropped when its uniform draw ``u ~ U[0, 1)`` is below ``p``; ``u`` is the top 53 bits of a
    word hashed from ``(seed, step, i, tag)`` by NumPy's ``SeedSequence`` (as :func:`example_seed` hashes
    ``(seed, step, i)``), so the mask is a pure function of ``(seed, step, i, p)``.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"label dropout probability {p} is outside [0, 1)")
    u = [label_uniform(seed, step, int(i)) for i in positions]
    return torch.tensor(u, dtype=torch.float64) < p


def label_uniform(seed: int, step: int, index: int) -> float:
    """The label-dropout draw ``u in [0, 1)`` of example ``index`` (global position) of step ``step``."""
    word = np.random.SeedSequence([seed % 2**63, step, index, _LABEL_DROPOUT_TAG]).generate_state(1, dtype=np.uint64)
    return float(int(word[0]) >> 11) * 2.0**-53


def drop_labels(y: torch.Tensor, seed: int, step: int, positions: Sequence[int], p: float,
                null_label: int) -> torch.Tensor:
    """``y`` (int64 ``[n]``) with the labels chosen by :func:`label_dropout_mask` replaced by ``null_label``.

    ``p == 0`` returns ``y`` itself (no draws: the original's training).
    """
    if p == 0:
        return y
    if len(positions) != y.shape[0]:
        raise ValueError(f"{len(positions)} positions for {y.shape[0]} labels")
    mask = label_dropout_mask(seed, step, positions, p).to(y.device)
    return torch.where(mask, torch.full_like(y, int(null_label)), y)
