"""Self-attention block of the U-Net through ``torch.nn.functional.scaled_dot_product_attention``.

Numerically the original's ``AttentionBlock`` + ``QKVAttention``: the 1x1 ``qkv`` convolution gives
``3C`` channels that the original reshapes to ``(B * heads, 3C / heads, L)`` and splits there, so the
channels of head ``h`` are grouped as ``[q_h | k_h | v_h]`` (each ``C / heads`` wide); q and k are
each scaled by ``(C / heads) ** -0.25`` (overall ``1 / sqrt(d)``, SDPA's default); the softmax is in
float32; the heads are concatenated, go through the 1x1 ``proj_out`` and are added to the input.

The parameters keep the original's ``Conv1d`` shapes (``qkv.weight`` ``[3C, C, 1]``) so checkpoints
load unchanged; the forward uses them as linear maps on a ``[B, L, C]`` view, which is free for a
channels_last input (no transpose copies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from iddpm.models.layers import conv_nd, normalization, zero_module

__all__ = ["AttentionBlock", "qkv_attention"]


def qkv_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head attention on a packed ``[B, L, 3C]`` tensor in the original's channel grouping.

    ``qkv[..., h*3d : h*3d+d]`` is q of head h, the next ``d`` are k, then v (``d = C / heads``).
    Returns ``[B, L, C]`` with channel ``h*d + c`` = output channel c of head h.
    """
    b, length, width = qkv.shape
    d = width // (3 * num_heads)
    q, k, v = qkv.view(b, length, num_heads, 3, d).unbind(dim=3)  # each [B, L, heads, d]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(b, length, num_heads * d)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection.  Input/output ``[B, C, *spatial]``.

    Parameters (state_dict keys): ``norm`` (GroupNorm32), ``qkv`` (Conv1d C -> 3C, kernel 1),
    ``proj_out`` (Conv1d C -> C, kernel 1, zero-initialised).  ``use_checkpoint`` recomputes the
    block in backward (gradient checkpointing) instead of storing activations.
    """

    def __init__(self, channels: int, num_heads: int = 1, use_checkpoint: bool = False):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the channel count {channels}")
        self.channels = channels
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        spatial = x.shape[2:]
        # [B, C, *spatial] -> [B, L, C]: a view for channels_last inputs.
        x_blc = x.flatten(2).transpose(1, 2)
        h = self.norm(x).flatten(2).transpose(1, 2)
        qkv = F.linear(h, self.qkv.weight.squeeze(-1), self.qkv.bias)
        a = qkv_attention(qkv, self.num_heads)
        out = F.linear(a, self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        out = out.add_(x_blc)  # residual, in place on the fresh projection output
        return out.transpose(1, 2).reshape(b, c, *spatial)
