"""Per-sample random streams: the same seed gives the same images whatever the batch size.

Sample ``i`` of a run seeded with ``seed`` owns one CPU ``torch.Generator`` seeded from
``(seed, i)`` (through :class:`numpy.random.SeedSequence`, so nearby seeds give unrelated streams).
Its draws, in order, are x_T and then one noise tensor per denoising step.  Because a stream
depends only on ``(seed, i)``, splitting the samples into batches differently (or over ranks, or
running on another device) gives the same noise for every sample.  Draws are made on the CPU and
moved to the target device, so CPU and GPU runs see identical noise.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = ["sample_seed", "PerSampleNoise"]


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of a run seeded with ``seed`` (deterministic, well mixed)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32, int(index)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


class PerSampleNoise:
    """Noise source for a batch of samples with global indices ``indices``.

    ``draw()`` returns float32 (len(indices), *shape) standard normal noise on ``device`` whose row ``j``
    is the next draw of sample ``indices[j]``'s own stream.  Call it once for x_T and once per step.
    """

    def __init__(self, seed: int, indices: Sequence[int], shape: Sequence[int], device: str | torch.device = "cpu"):
        self.shape = tuple(int(s) for s in shape)
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]

    def draw(self) -> torch.Tensor:
        rows = [torch.randn(self.shape, generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(rows).to(self.device)

    def stream(self) -> Iterator[torch.Tensor]:
        """Endless draws (each ``(len(indices), *shape)``): the diffusion loops' ``step_noise=`` seam."""
        while True:
            yield self.draw()

    def draw_like(self, x: torch.Tensor) -> torch.Tensor:
        """Like ``torch.randn_like(x)`` but from the per-sample streams (``x.shape[1:]`` must be ``shape``)."""
        if tuple(x.shape) != (len(self.generators), *self.shape):
            raise ValueError(f"noise requested for shape {tuple(x.shape)}, streams give "
                             f"{(len(self.generators), *self.shape)}")
        return self.draw().to(device=x.device, dtype=x.dtype)
