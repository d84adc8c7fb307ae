"""The U-Net of improved-diffusion (``UNetModel``) and its super-resolution variant (``SuperResModel``).

Constructor arguments, module tree and state_dict keys/shapes are the original's, so its released
checkpoints load with ``strict=True``.  Forward: ``model(x [N, C_in, *spatial], timesteps [N], y=None)``
-> ``[N, C_out, *spatial]``; ``timesteps`` may be int or float (fractional when the diffusion rescales
them to [0, 1000)); ``y`` ``[N]`` int64 class labels iff the model is class-conditional.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from iddpm.models.attention import AttentionBlock
from iddpm.models.blocks import Downsample, ResBlock, TimestepEmbedSequential, Upsample
from iddpm.models.layers import conv_nd, normalization, silu, timestep_embedding, zero_module

__all__ = ["UNetModel", "SuperResModel"]


class UNetModel(nn.Module):
    """The full U-Net with attention and timestep embedding.

    :param in_channels: channels of the input tensor.
    :param model_channels: base channel count (``time_embed`` width is 4x this).
    :param out_channels: channels of the output (2x the image channels for learned sigmas).
    :param num_res_blocks: residual blocks per resolution level.
    :param attention_resolutions: downsample rates (1, 2, 4, ...) at which attention is used;
        e.g. ``(2, 4)`` for attention at 16x16 and 8x8 of a 32x32 input.
    :param dropout: dropout probability inside the residual blocks.
    :param channel_mult: channel multiplier per level (one level per entry; each but the last
        ends with a x2 downsample).
    :param conv_resample: learned 3x3 convolutions for up/down-sampling (else nearest / avg pool).
    :param dims: 1, 2 or 3 spatial dimensions.
    :param num_classes: number of classes for a class-conditional model (label embedding), or None.
    :param use_checkpoint: gradient checkpointing of every block (less memory, one extra forward).
    :param num_heads: attention heads in the down path and middle.
    :param num_heads_upsample: heads in the up path; -1 means ``num_heads``.
    :param use_scale_shift_norm: FiLM-like conditioning (GN(h) * (1 + scale) + shift).
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        num_heads: int = 1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        attention_resolutions = tuple(int(a) for a in attention_resolutions)
        channel_mult = tuple(int(m) for m in channel_mult)

        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.dims = dims
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_heads_upsample = num_heads_upsample
        self.use_scale_shift_norm = use_scale_shift_norm

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def res_block(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, dropout, out_channels=ch_out, dims=dims,
                            use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads, use_checkpoint=use_checkpoint))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample, dims=dims)))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch),
            AttentionBlock(ch, num_heads=num_heads, use_checkpoint=use_checkpoint),
            res_block(ch, ch),
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + input_block_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads_upsample, use_checkpoint=use_checkpoint))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample, dims=dims))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)),
        )

    @property
    def inner_dtype(self) -> torch.dtype:
        """dtype of the torso (input/middle/output blocks): float32, or float16 after :meth:`convert_to_fp16`."""
        return self.input_blocks[0][0].weight.dtype

    def convert_to_fp16(self) -> None:
        """The original's fp16 mode: convolution weights of the torso become float16 (GroupNorm, the
        embedding MLPs and the output head stay float32; GroupNorm is computed in float32)."""
        self._convert_torso(torch.float16)

    def convert_to_fp32(self) -> None:
        """Undo :meth:`convert_to_fp16`."""
        self._convert_torso(torch.float32)

    def _convert_torso(self, dtype: torch.dtype) -> None:
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            for module in part.modules():
                if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    module.weight.data = module.weight.data.to(dtype)
                    if module.bias is not None:
                        module.bias.data = module.bias.data.to(dtype)

    def embed(self, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The ``[N, 4 * model_channels]`` conditioning: time-embedding MLP output plus label embedding."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(
                "class labels y must be given exactly when the model is class-conditional "
                f"(num_classes={self.num_classes}, y {'given' if y is not None else 'missing'})"
            )
        lin0, _, lin2 = self.time_embed
        t_emb = timestep_embedding(timesteps, self.model_channels).to(lin0.weight.dtype)
        emb = lin2(F.silu(lin0(t_emb)))
        if y is not None:
            emb = emb + self.label_emb(y)
        return emb

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the model: ``x`` ``[N, C_in, *spatial]``, ``timesteps`` ``[N]``, ``y`` ``[N]`` labels or None."""
        emb = self.embed(timesteps, y)
        hs = []
        h = x.to(self.inner_dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self._head(h.to(x.dtype))

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        norm, _, conv = self.out
        return conv(silu(norm(h)))

    def get_feature_vectors(
        self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None
    ) -> dict[str, list[torch.Tensor] | torch.Tensor]:
        """Intermediate activations: ``{"down": [after each input block], "middle": ..., "up": [after each
        output block]}`` (the original's ``get_feature_vectors``)."""
        emb = self.embed(timesteps, y)
        result: dict = dict(down=[], up=[])
        hs = []
        h = x.to(self.inner_dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
            result["down"].append(h.to(x.dtype))
        h = self.middle_block(h, emb)
        result["middle"] = h.to(x.dtype)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
            result["up"].append(h.to(x.dtype))
        return result


class SuperResModel(UNetModel):
    """U-Net conditioned on a low-resolution image: ``low_res`` is resized to ``x``'s size (bilinear,
    align_corners=False) and concatenated to ``x`` along channels, so the inner U-Net sees
    ``2 * in_channels`` input channels.  Forward: ``model(x, timesteps, low_res=..., y=None)``.
    """

    def __init__(self, in_channels: int, *args, **kwargs):
        super().__init__(in_channels * 2, *args, **kwargs)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, low_res: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(self._concat_low_res(x, low_res), timesteps, y=y)

    def get_feature_vectors(self, x, timesteps, low_res=None, y=None):
        """Intermediate activations (works, unlike the original's, which unpacks shapes wrongly)."""
        return super().get_feature_vectors(self._concat_low_res(x, low_res), timesteps, y=y)

    @staticmethod
    def _concat_low_res(x: torch.Tensor, low_res: torch.Tensor | None) -> torch.Tensor:
        if low_res is None:
            raise ValueError("SuperResModel needs low_res=[N, C, h, w] (the low-resolution image to upsample)")
        upsampled = F.interpolate(low_res, tuple(x.shape[2:]), mode="bilinear", align_corners=False)
        return torch.cat([x, upsampled.to(x.dtype)], dim=1)
