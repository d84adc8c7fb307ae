"""Timestep respacing: sample (or evaluate) a T-step diffusion with a subset of its timesteps."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion

__all__ = ["space_timesteps", "SpacedDiffusion"]


def _ddim_counts(num_timesteps: int) -> list[int]:
    """Every N for which ``ddimN`` works on ``num_timesteps`` steps, ascending."""
    return sorted({len(range(0, num_timesteps, i)) for i in range(1, num_timesteps)})


def _parse_sections(num_timesteps: int, section_counts) -> list[int]:
    if isinstance(section_counts, str):
        try:
            counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep respacing {section_counts!r}: expected 'N', 'ddimN' or comma-separated counts "
                "like '10,15,20'"
            ) from None
    else:
        counts = [int(x) for x in section_counts]
    if not counts:
        raise ValueError("timestep respacing: no section counts given")
    if any(c < 0 for c in counts):
        raise ValueError(f"timestep respacing {section_counts!r}: counts must be >= 0")
    return counts


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """The set of original timesteps (0..num_timesteps-1) to keep, exactly as the original chooses them.

    :param section_counts: ``"ddimN"``: the smallest integer stride i >= 1 with ``len(range(0, T, i)) == N``
        (as in the DDIM paper); otherwise comma-separated counts (string or list of ints): the T steps are split
        into that many nearly equal sections (the first ``T % len`` one step longer) and section j keeps
        ``counts[j]`` evenly strided steps (stride ``(size - 1) / (count - 1)``, positions accumulated by float
        addition and rounded half to even).  ``"250"`` keeps 250 evenly spaced steps of all T.
    :return: a set of ints (the original returns a set; ``sorted()`` it for the ascending list).
    :raises ValueError: for impossible requests, naming the request and close valid values.
    """
    if int(num_timesteps) < 1:
        raise ValueError(f"number of diffusion steps must be >= 1, got {num_timesteps!r}")
    num_timesteps = int(num_timesteps)
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        try:
            desired_count = int(section_counts[len("ddim") :])
        except ValueError:
            raise ValueError(f"timestep respacing {section_counts!r}: expected ddimN with an integer N") from None
        for i in range(1, num_timesteps):
            if len(range(0, num_timesteps, i)) == desired_count:
                return set(range(0, num_timesteps, i))
        valid = _ddim_counts(num_timesteps)
        below = [n for n in valid if n < desired_count]
        above = [n for n in valid if n > desired_count]
        tries = [f"ddim{below[-1]}"] if below else []
        tries += [f"ddim{above[0]}"] if above else []
        if desired_count <= num_timesteps:
            tries.append(str(desired_count))
        hint = f"; try {' or '.join(tries)}" if tries else ""
        raise ValueError(
            f"timestep respacing {section_counts!r}: {num_timesteps} steps cannot be strided into exactly "
            f"{desired_count} with an integer stride{hint}"
        )
    counts = _parse_sections(num_timesteps, section_counts)
    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            fixed = list(counts)
            fixed[i] = size
            raise ValueError(
                f"timestep respacing {section_counts!r}: section {i + 1} of {len(counts)} has {size} of the "
                f"{num_timesteps} steps and cannot be divided into {section_count}; use at most {size} there "
                f"(e.g. {','.join(map(str, fixed))!r})"
            )
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion that skips steps of a base diffusion.

    :param use_timesteps: the original timesteps to keep (e.g. from :func:`space_timesteps`).
    :param kwargs: the base diffusion's :class:`GaussianDiffusion` arguments (``betas`` of the full schedule).

    The kept steps get betas ``1 - abar[i] / abar[previous kept i]``, so the marginals q(x_t | x_0) at kept steps
    are unchanged.  ``timestep_map[k]`` is the original timestep of respaced index k; the model receives
    ``timestep_map[t]`` (int64), or with ``rescale_timesteps`` ``float32(timestep_map[t]) * float32(1000 / T_orig)``,
    so a model trained on the full diffusion works unchanged.
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        if "betas" not in kwargs:
            raise TypeError("SpacedDiffusion needs betas= (the full, unspaced schedule)")
        base_betas = np.array(kwargs["betas"], dtype=np.float64)
        self.original_num_steps = len(base_betas)
        self.use_timesteps = {int(i) for i in use_timesteps}
        bad = sorted(i for i in self.use_timesteps if not 0 <= i < self.original_num_steps)
        if bad:
            raise ValueError(
                f"use_timesteps must lie in 0..{self.original_num_steps - 1}; got {bad[:5]}"
                + (" ..." if len(bad) > 5 else "")
            )
        self.timestep_map = sorted(self.use_timesteps)
        alphas_cumprod = np.cumprod(1.0 - base_betas, axis=0)
        kept = np.array(self.timestep_map, dtype=np.int64)
        kept_abar = alphas_cumprod[kept]
        prev_abar = np.append(1.0, kept_abar[:-1])
        kwargs["betas"] = 1 - kept_abar / prev_abar
        super().__init__(**kwargs)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original timesteps ``timestep_map[t]`` (int64), rescaled to 0..1000 with ``rescale_timesteps``."""
        map_tensor = torch.tensor(self.timestep_map, device=t.device, dtype=t.dtype)
        new_ts = map_tensor[t]
        if self.rescale_timesteps:
            factor = torch.tensor(1000.0 / self.original_num_steps, dtype=torch.float32, device=t.device)
            return new_ts.to(torch.float32) * factor
        return new_ts

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", original_num_steps={self.original_num_steps})"
