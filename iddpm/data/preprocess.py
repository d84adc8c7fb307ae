"""Image preprocessing exactly as the original's ``ImageDataset`` (improved-diffusion).

Pipeline for one image and a target resolution ``R``:

1. while ``min(width, height) >= 2 * R``: halve both sides (integer division) with ``Image.BOX``;
2. resize so the short side is ``R`` (each side ``round(side * R / short)``) with ``Image.BICUBIC``;
3. convert to the output mode (``"L"`` for 1 channel, ``"RGB"`` for 3) -- after resizing, as the
   original converts to RGB after resizing;
4. center crop ``R x R`` (offset ``(side - R) // 2``);
5. map uint8 ``v`` to ``v / 127.5 - 1`` in float32, layout ``[C, H, W]``.

Steps 1-4 give a uint8 ``[R, R, C]`` array (:func:`preprocess_pil`); step 5 is :func:`to_model_range`.

Images of more than 8 bits per sample are first brought to 8 bits by :func:`to_8bit` (the original's
``convert("RGB")`` clips 16-bit grayscale to 255: a 0..65520 ramp becomes all white); 8-bit images pass
through untouched, so their pipeline is exactly the original's.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from iddpm.config import ConfigError

__all__ = ["MODES", "to_8bit", "resize_like_original", "preprocess_pil", "array_to_pil", "to_model_range",
           "preprocess_array"]

MODES = {1: "L", 3: "RGB"}
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})  # unsigned 16-bit grayscale
_U16_MAX = 65535


def _round_16_to_8(values: np.ndarray) -> np.ndarray:
    """uint 0..65535 -> uint8 ``round(v * 255 / 65535) = round(v / 257)``, half up, in integers.

    Dividing by 257 (not ``v >> 8``) is the exact inverse of the usual 8 -> 16 bit expansion ``v * 257``:
    65535 -> 255, 257 * k -> k, and every output level covers an equal share of the input range.
    """
    v = values.astype(np.int64)
    return ((2 * v + 257) // 514).astype(np.uint8)


def _range_to_8(values: np.ndarray) -> np.ndarray:
    """Any numbers -> uint8 by their own range ``(v - min) / (max - min) * 255`` (a constant image -> 0)."""
    v = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(v.min()), float(v.max())
    scaled = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    return np.floor(scaled * 255 + 0.5).astype(np.uint8)


def to_8bit(image: Image.Image) -> Image.Image:
    """A PIL image with 8-bit samples: 16-bit, 32-bit integer and float grayscale become ``"L"``.

    - ``I;16`` / ``I;16L`` / ``I;16B`` / ``I;16N`` (16-bit PNG / TIFF): ``round(v / 257)``, see
      :func:`_round_16_to_8`.
    - ``I`` (32-bit signed): values within 0..65535 are taken as 16-bit data (older Pillow decodes 16-bit
      PNGs as ``I``; white is 65535, so a dark image stays dark); values outside it have no defined white
      level and are scaled by the image's own range.
    - ``F`` (32-bit float): values within [0, 1] are ``round(v * 255)``; others (e.g. 0..255 floats) are
      scaled by the image's own range; NaN and inf count as 0.
    Every other mode (``L``, ``RGB``, ``P``, ``RGBA``, ...) is returned as is: PIL's own conversion handles
    it (PIL already decodes 16-bit RGB PNGs to 8-bit ``RGB`` by the high byte).
    """
    mode = image.mode
    if mode not in SIXTEEN_BIT_MODES and mode not in ("I", "F"):
        return image
    values = np.asarray(image)
    within = bool(values.size) and np.isfinite(values).all() and values.min() >= 0
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and within and values.max() <= _U16_MAX):
        out = _round_16_to_8(values)
    elif mode == "F" and within and values.max() <= 1:
        out = np.floor(values.astype(np.float64) * 255 + 0.5).astype(np.uint8)
    else:
        out = _range_to_8(values)
    return Image.fromarray(out)  # uint8 [H, W] -> "L"


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
    """Steps 1-4: a PIL image of any size/mode -> uint8 ``[resolution, resolution, in_channels]``.

    16-bit / 32-bit / float images are first made 8-bit (:func:`to_8bit`)."""
    mode = _mode_for(in_channels)
    image = resize_like_original(to_8bit(image), resolution)
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
