"""Per-example training randomness: timestep, importance weight and noise of each example.

Example ``i`` of optimizer step ``s`` (``i`` = its position in the *global* batch) draws its timestep
(through the schedule sampler) and then its noise from one CPU generator seeded with
``example_seed(seed, s, i)``.  The draws therefore do not depend on the micro-batch size, the
number of ranks or the device, and resuming at step ``s`` needs no generator state.
With the loader's interleaved sharding, rank ``r`` of ``W`` holds global positions ``r + W * j``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from iddpm.runtime.seeding import example_seed


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
