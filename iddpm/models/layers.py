"""Small building blocks of the U-Net: normalisation, convolutions, timestep embedding.

Conventions: tensors are ``[N, C, *spatial]`` (``spatial`` = (L,), (H, W) or (D, H, W) for
``dims`` 1, 2, 3) in any memory format; nothing here forces a contiguous NCHW layout, so a
channels_last input stays channels_last end to end.
"""

from __future__ import annotations

import math
import struct

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GroupNorm32",
    "normalization",
    "conv_nd",
    "avg_pool_nd",
    "zero_module",
    "timestep_embedding",
    "silu",
    "channels_last_format",
    "dropout",
]


class GroupNorm32(nn.GroupNorm):
    """``nn.GroupNorm`` computed in at least float32 (half types are upcast); the result is cast back.

    (The original's ``GroupNorm32``: ``super().forward(x.float()).type(x.dtype)``.)  A float32
    or float64 input is normalised directly in its own dtype, with no conversion pass.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.group_norm(x.float(), self.num_groups, w, b, self.eps)
        return out.to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The original's normalisation layer: GroupNorm with 32 groups, eps 1e-5, affine."""
    return GroupNorm32(32, channels)


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU ``x * sigmoid(x)``; in place (no extra allocation) when autograd is off.

    Only call it on a freshly produced temporary (e.g. a GroupNorm output) -- never on a tensor
    someone else still holds.
    """
    return F.silu(x, inplace=not torch.is_grad_enabled())


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` for ``dims`` 1 / 2 / 3."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"dims={dims}: only 1, 2 or 3 spatial dimensions are supported")


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """``nn.AvgPool1d`` / ``2d`` / ``3d`` for ``dims`` 1 / 2 / 3."""
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"dims={dims}: only 1, 2 or 3 spatial dimensions are supported")


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it (the original's output layers start at 0)."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def channels_last_format(ndim: int) -> torch.memory_format | None:
    """The channels-last memory format for a tensor of ``ndim`` dims (4 -> 2D, 5 -> 3D), else None."""
    if ndim == 4:
        return torch.channels_last
    if ndim == 5:
        return torch.channels_last_3d
    return None


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal timestep embedding, exactly as the original computes it (float32 torch ops).

    ``timesteps``: ``[N]`` int or float (fractional values allowed).  Returns float32 ``[N, dim]``
    = ``concat(cos(t * f), sin(t * f))`` (cos first) with ``f_i = exp(-ln(max_period) * i / half)``,
    ``i < half = dim // 2``, and a zero column appended when ``dim`` is odd.  The frequencies
    are formed in float32 with the same op order as the original so results match bit for bit.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    freqs = freqs.to(device=timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class _MulByMask(torch.autograd.Function):
    """``x * mask`` whose backward is ``grad * mask`` (the mask is saved, not recomputed; no grad for it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout, cheaper than ``F.dropout`` on CPU (same distribution, different random stream).

    Each element is kept with probability ``1 - p`` (exact to 2**-31) and scaled by ``1 / (1 - p)``,
    otherwise zeroed -- the distribution of ``nn.Dropout(p)`` in training mode.  For a float32 CPU
    tensor the keep mask comes from one 31-bit integer draw per element of the global generator
    (``torch.manual_seed`` makes it reproducible, and ``torch.utils.checkpoint`` replays it), compared
    in place with ``round(p * 2**31)``; the 0/1 integers are then multiplied in place by the bit
    pattern of the float32 scale, so the same buffer read as float32 is the scaled mask (0.0 or
    ``1 / (1 - p)``).  Forward + backward cost about half of ``F.dropout``'s.  Other dtypes and
    devices, and code traced by ``torch.compile``, use ``F.dropout``.  The result keeps ``x``'s memory format.
    """
    if p <= 0:
        return x
    if p >= 1:
        return x * 0.0
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.compiler.is_compiling():
        return F.dropout(x, p, training=True)
    scale_bits = struct.unpack("<i", struct.pack("<f", 1.0 / (1.0 - p)))[0]
    mask = torch.empty_like(x, dtype=torch.int32).random_()  # uniform on [0, 2**31)
    mask.ge_(int(round(p * 2**31))).mul_(scale_bits)  # 0 (drop) or the bits of float32(1 / (1 - p)) (keep)
    return _MulByMask.apply(x, mask.view(torch.float32))
