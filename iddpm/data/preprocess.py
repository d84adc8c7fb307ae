"""Image preprocessing exactly as the original's ``ImageDataset`` (improved-diffusion).

Pipeline for one image and a target resolution ``R``:

1. while ``min(width, height) >= 2 * R``: halve both sides (integer division) with ``Image.BOX``;
2. resize so the short side is ``R`` (each side ``round(side * R / short)``) with ``Image.BICUBIC``;
3. convert to the output mode (``"L"`` for 1 channel, ``"RGB"`` for 3) -- after resizing, as the
   original converts to RGB after resizing;
4. center crop ``R x R`` (offset ``(side - R) // 2``);
5. map uint8 ``v`` to ``v / 127.5 - 1`` in float32, layout ``[C, H, W]``.

Steps 1-4 give a uint8 ``[R, R, C]`` array (:func:`preprocess_pil`); step 5 is :func:`to_model_range`.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from iddpm.config import ConfigError

__all__ = ["MODES", "resize_like_original", "preprocess_pil", "array_to_pil", "to_model_range", "preprocess_array"]

MODES = {1: "L", 3: "RGB"}


def _mode_for(in_channels: int) -> str:
    if in_channels not in MODES:
        raise ConfigError(f"--in_channels {in_channels}: images can be loaded as 1 (grayscale) or 3 (RGB) channels")
    return MODES[in_channels]


def resize_like_original(image: Image.Image, resolution: int) -> Image.Image:
    """Steps 1-2: BOX halving while the short side >= 2*resolution, then BICUBIC to short side == resolution."""
    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(*image.size)
    return image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)


def preprocess_pil(image: Image.Image, resolution: int, in_channels: int) -> np.ndarray:
    """Steps 1-4: a PIL image of any size/mode -> uint8 ``[resolution, resolution, in_channels]``."""
    mode = _mode_for(in_channels)
    image = resize_like_original(image, resolution)
    arr = np.array(image.convert(mode))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    crop_y = (arr.shape[0] - resolution) // 2
    crop_x = (arr.shape[1] - resolution) // 2
    return np.ascontiguousarray(arr[crop_y : crop_y + resolution, crop_x : crop_x + resolution])


def array_to_pil(arr: np.ndarray) -> Image.Image:
    """uint8 ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]`` -> PIL image (L / RGB / RGBA)."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(arr))


def preprocess_array(arr: np.ndarray, resolution: int, in_channels: int) -> np.ndarray:
    """uint8 HW/HWC image -> uint8 ``[resolution, resolution, in_channels]`` (no-op when already so)."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[0] == arr.shape[1] == resolution and arr.shape[2] == in_channels:
        return arr
    return preprocess_pil(array_to_pil(arr), resolution, in_channels)


def to_model_range(arr: np.ndarray) -> torch.Tensor:
    """Step 5: uint8 ``[H, W, C]`` -> float32 ``[C, H, W]`` in [-1, 1] (``v / 127.5 - 1``)."""
    x = arr.astype(np.float32) / 127.5 - 1
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (2, 0, 1))))
