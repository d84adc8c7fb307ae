"""Residual, down- and up-sampling blocks of the U-Net (the original's module names and keys).

Every block maps ``[N, C, *spatial]`` to ``[N, C', *spatial']`` and keeps the input's memory
format (channels_last in -> channels_last out).  ``emb`` is the ``[N, E]`` timestep (+ label)
embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from iddpm.models.layers import avg_pool_nd, conv_nd, dropout, normalization, silu, zero_module

__all__ = ["TimestepBlock", "TimestepEmbedSequential", "ResBlock", "Downsample", "Upsample"]


class TimestepBlock(nn.Module):
    """A block whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """``nn.Sequential`` that passes ``emb`` to the children that are :class:`TimestepBlock`."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling (the inner two dims for ``dims=3``), then a 3x3 conv if ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2):
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """x2 downsampling: 3x3 conv with stride 2, padding 1 (``use_conv``) or average pooling.

    For ``dims=3`` only the inner two dims are downsampled.  The layer is named ``op`` (state_dict key).
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2):
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, channels, channels, 3, stride=stride, padding=1)
        else:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the embedding.

    ``in_layers`` = [GroupNorm, SiLU, 3x3 conv]; ``emb_layers`` = [SiLU, Linear(E, C_out or 2*C_out)];
    ``out_layers`` = [GroupNorm, SiLU, Dropout, zero-initialised 3x3 conv]; ``skip_connection`` =
    identity, or a 1x1 conv (3x3 with ``use_conv``) when the channel count changes.

    With ``use_scale_shift_norm`` the embedding gives (scale, shift) and the output branch is
    ``conv(dropout(silu(GN(h) * (1 + scale) + shift))))``; without it, ``emb_proj`` is added to ``h``
    before ``out_layers``.  The indexed ``nn.Sequential`` containers exist for the state_dict keys;
    the forward calls their members directly (fewer passes: GN affine + scale/shift fused into one
    ``addcmul``, SiLU in place when autograd is off, dropout skipped when inactive).
    """

    #: set by :func:`iddpm.models.optimize`: use :func:`iddpm.models.layers.dropout` (cheaper random draws on
    #: CPU, same distribution) instead of ``nn.Dropout``.  Not a parameter: no effect on the state_dict.
    fast: bool = False

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.dims = dims

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        in_norm, _, in_conv = self.in_layers
        out_norm, _, drop, out_conv = self.out_layers
        h = in_conv(silu(in_norm(x)))
        emb_out = self.emb_layers[1](F.silu(emb)).to(h.dtype)
        emb_out = emb_out.view(*emb_out.shape, *([1] * self.dims))  # [N, C', 1, 1]: broadcasts, no copy
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            # GN(h) * (1 + scale) + shift with the GN affine folded into the per-sample factors:
            # one normalisation pass plus one fused multiply-add instead of three elementwise passes.
            hn = _group_norm_no_affine(out_norm, h)
            w = out_norm.weight.view(-1, *([1] * self.dims)).to(h.dtype)
            b = out_norm.bias.view(-1, *([1] * self.dims)).to(h.dtype)
            factor = w * (1 + scale)
            offset = torch.addcmul(shift, b, 1 + scale)
            if torch.is_grad_enabled() or torch.compiler.is_compiling():  # (dynamo rejects out=)
                h = torch.addcmul(offset, hn, factor)
            else:  # hn is a temporary: write in place (no allocation)
                h = torch.addcmul(offset, hn, factor, out=hn)
        else:
            # in place on the conv output (a temporary that conv's backward does not need)
            h = out_norm(h.add_(emb_out))
        h = silu(h)
        if self.training and drop.p > 0:
            h = dropout(h, drop.p) if self.fast else drop(h)
        h = out_conv(h)
        return h.add_(self.skip_connection(x))  # in place on the fresh conv output


def _group_norm_no_affine(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm without its affine part, computed in float32 and cast back to ``x.dtype``."""
    if x.dtype in (torch.float32, torch.float64):
        return F.group_norm(x, norm.num_groups, None, None, norm.eps)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.group_norm(x.float(), norm.num_groups, None, None, norm.eps).to(x.dtype)
