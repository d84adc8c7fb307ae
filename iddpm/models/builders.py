"""``create_model`` / ``sr_create_model``: the original scripts' model factories, with clearer errors.

``attention_resolutions`` are *resolutions* here (``"16,8"`` = attention at 16x16 and 8x8); they become
the U-Net's downsample rates ``image_size // res``.  ``channel_mult`` defaults to the original's choice
per image size (32: 1,2,2,2; 64: 1,2,3,4; 256: 1,1,2,2,4,4); pass it explicitly for any other size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from iddpm.config import ConfigError
from iddpm.models.unet import SuperResModel, UNetModel

__all__ = ["create_model", "sr_create_model", "default_channel_mult", "attention_downsample_rates"]

# The original's channel multipliers per (large) image size.
_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}


def default_channel_mult(image_size: int, flag: str = "image_size") -> tuple[int, ...]:
    """The original's ``channel_mult`` for ``image_size``; ConfigError for sizes it does not define."""
    if image_size not in _CHANNEL_MULT:
        sizes = ", ".join(str(s) for s in sorted(_CHANNEL_MULT))
        raise ConfigError(
            f"--{flag} {image_size}: no default channel_mult for this size (defined for {sizes}); "
            f"pass --channel_mult explicitly, e.g. 1,2,2 (image size divisible by 2^(levels-1))"
        )
    return _CHANNEL_MULT[image_size]


def _check_channel_mult(image_size: int, channel_mult: Sequence[int], flag: str) -> tuple[int, ...]:
    mult = tuple(int(m) for m in channel_mult)
    if not mult or any(m < 1 for m in mult):
        raise ConfigError(f"--channel_mult {','.join(map(str, mult))}: need one or more positive integers")
    factor = 2 ** (len(mult) - 1)
    if image_size % factor:
        raise ConfigError(
            f"--{flag} {image_size}: must be divisible by 2^(levels-1) = {factor} for --channel_mult "
            f"{','.join(map(str, mult))}; use fewer levels or another size"
        )
    return mult


def attention_downsample_rates(
    attention_resolutions: str | Iterable[int], image_size: int, levels: int
) -> tuple[int, ...]:
    """``"16,8"`` at image size 32 -> ``(2, 4)``; ConfigError for a resolution no U-Net level has."""
    if isinstance(attention_resolutions, str):
        parts = [p.strip() for p in attention_resolutions.split(",") if p.strip()]
        try:
            resolutions = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(
                f"--attention_resolutions {attention_resolutions!r}: expected comma-separated integers, e.g. 16,8"
            ) from None
    else:
        resolutions = [int(r) for r in attention_resolutions]
    reachable = {image_size // 2**i for i in range(levels)}
    rates = []
    for res in resolutions:
        if res not in reachable:
            raise ConfigError(
                f"--attention_resolutions {res}: no U-Net level has resolution {res} for image size {image_size} "
                f"(levels: {', '.join(str(r) for r in sorted(reachable, reverse=True))})"
            )
        rates.append(image_size // res)
    return tuple(rates)


def _unet_kwargs(image_size, num_channels, num_res_blocks, learn_sigma, class_cond, use_checkpoint,
                 attention_resolutions, num_heads, num_heads_upsample, use_scale_shift_norm, dropout,
                 channel_mult, in_channels, num_classes, flag):
    if channel_mult is None or len(tuple(channel_mult)) == 0:
        channel_mult = default_channel_mult(image_size, flag)
    channel_mult = _check_channel_mult(image_size, channel_mult, flag)
    if num_channels < 32 or num_channels % 32:
        raise ConfigError(
            f"--num_channels {num_channels}: must be a positive multiple of 32 (GroupNorm uses 32 groups)"
        )
    return dict(
        model_channels=num_channels,
        out_channels=in_channels * (2 if learn_sigma else 1),
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_downsample_rates(attention_resolutions, image_size, len(channel_mult)),
        dropout=dropout,
        channel_mult=channel_mult,
        num_classes=num_classes if class_cond else None,
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
    )


def create_model(
    image_size: int,
    num_channels: int,
    num_res_blocks: int,
    learn_sigma: bool,
    class_cond: bool,
    use_checkpoint: bool,
    attention_resolutions: str | Iterable[int],
    num_heads: int,
    num_heads_upsample: int,
    use_scale_shift_norm: bool,
    dropout: float,
    *,
    channel_mult: Sequence[int] | None = None,
    in_channels: int = 3,
    num_classes: int = 1000,
) -> UNetModel:
    """A :class:`UNetModel` for ``image_size`` x ``image_size`` images with ``in_channels`` channels.

    Output channels: ``in_channels`` (eps) or ``2 * in_channels`` (eps and variance) with ``learn_sigma``.
    """
    kw = _unet_kwargs(image_size, num_channels, num_res_blocks, learn_sigma, class_cond, use_checkpoint,
                      attention_resolutions, num_heads, num_heads_upsample, use_scale_shift_norm, dropout,
                      channel_mult, in_channels, num_classes, "image_size")
    return UNetModel(in_channels=in_channels, **kw)


def sr_create_model(
    large_size: int,
    small_size: int,
    num_channels: int,
    num_res_blocks: int,
    learn_sigma: bool,
    class_cond: bool,
    use_checkpoint: bool,
    attention_resolutions: str | Iterable[int],
    num_heads: int,
    num_heads_upsample: int,
    use_scale_shift_norm: bool,
    dropout: float,
    *,
    channel_mult: Sequence[int] | None = None,
    in_channels: int = 3,
    num_classes: int = 1000,
) -> SuperResModel:
    """A :class:`SuperResModel` producing ``large_size`` images from ``small_size`` ones.

    ``small_size`` is not part of the network (low_res is resized to the input's size) but is checked.
    The original defines ``channel_mult`` for large sizes 256 and 64 (and 32 here, as for ``create_model``).
    """
    if not 0 < small_size < large_size:
        raise ConfigError(f"--small_size {small_size}: must be positive and smaller than --large_size {large_size}")
    kw = _unet_kwargs(large_size, num_channels, num_res_blocks, learn_sigma, class_cond, use_checkpoint,
                      attention_resolutions, num_heads, num_heads_upsample, use_scale_shift_norm, dropout,
                      channel_mult, in_channels, num_classes, "large_size")
    return SuperResModel(in_channels=in_channels, **kw)
