"""Sample files: the original's ``.npz`` layout, PNG grids, per-sample PNGs, trajectory strips / GIFs.

Interchange format: ``uint8`` numpy arrays in NHWC order (N, H, W, C) with C = 1 (grayscale) or 3 (RGB),
exactly what the original's ``image_sample.py`` writes as ``arr_0`` (``arr_1`` holds int64 class labels
for class-conditional models).  All writers are atomic (a crash leaves no half-written file).
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from iddpm.data.sources import read_npz_images
from iddpm.runtime.atomic import atomic_write_bytes

__all__ = [
    "to_uint8",
    "npz_name",
    "save_npz",
    "load_npz",
    "make_grid",
    "grid_image",
    "save_grid",
    "save_pngs",
    "save_trajectory",
]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float samples in [-1, 1], NCHW -> uint8 NHWC numpy, as the original: ``((x + 1) * 127.5).clamp(0, 255)``.

    The float -> uint8 cast truncates toward zero, like the original's ``.to(th.uint8)``.
    """
    x = ((x.detach().float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def npz_name(images: np.ndarray) -> str:
    """The original's file name for an (N, H, W, C) array: ``samples_{N}x{H}x{W}x{C}.npz``."""
    return "samples_" + "x".join(str(s) for s in images.shape) + ".npz"


def save_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write ``arr_0`` (uint8 NHWC) and, when given, ``arr_1`` (int64 labels) like the original.

    ``path`` may be a folder, in which case the original's name :func:`npz_name` is used inside it.
    Returns the file written.
    """
    images = _check_nhwc(images)
    path = Path(path)
    if path.suffix != ".npz":
        path = path / npz_name(images)
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {labels.shape} does not match {images.shape[0]} images")
        arrays["arr_1"] = labels
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_npz(path: str | os.PathLike, flag: str = "--base_samples") -> tuple[np.ndarray, np.ndarray | None]:
    """Read a samples npz: ``(images uint8 NHWC, labels int64 or None)``.

    Read with ``allow_pickle=False`` (:func:`iddpm.data.sources.read_npz_images`): a missing, non-npz or damaged
    file, an object array, or arrays of the wrong kind give a one-line ConfigError naming ``flag`` and the file.
    """
    return read_npz_images(path, flag=flag)


def _check_nhwc(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected uint8 images (N, H, W, C) with C in 1/3/4, got {images.dtype} {images.shape}")
    return images


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile uint8 NHWC images into one (H', W', C) image, ``nrow`` images per row (default ~sqrt(N)).

    ``pad`` pixels of ``pad_value`` separate the tiles and surround the grid.
    """
    images = _check_nhwc(images)
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("make_grid: no images")
    ncol = nrow if nrow else max(1, math.ceil(math.sqrt(n)))
    ncol = min(ncol, n)
    nrows = math.ceil(n / ncol)
    grid = np.full((pad + nrows * (h + pad), pad + ncol * (w + pad), c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def _png_bytes(image_hwc: np.ndarray, scale: int = 1) -> bytes:
    img = _to_pil(image_hwc, scale)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _to_pil(image_hwc: np.ndarray, scale: int = 1):
    arr = image_hwc[..., 0] if image_hwc.shape[-1] == 1 else image_hwc
    img = Image.fromarray(np.ascontiguousarray(arr))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def _auto_scale(h: int) -> int:
    """Nearest-neighbour magnification so tiny images (8x8 digits) stay visible: at least ~64 px tiles."""
    return max(1, 64 // h) if h < 64 else 1


def grid_image(images: np.ndarray, nrow: int | None = None, pad: int = 2, scale: int | None = None):
    """A ``PIL.Image`` grid of uint8 NHWC images; ``scale`` (default: auto, tiles >= 64 px) magnifies each
    pixel with nearest-neighbour so tiny images are visible."""
    images = _check_nhwc(images)
    s = _auto_scale(images.shape[1]) if scale is None else int(scale)
    if s > 1:
        images = images.repeat(s, axis=1).repeat(s, axis=2)
    return _to_pil(make_grid(images, nrow=nrow, pad=pad))


def save_grid(images: np.ndarray, path: str | os.PathLike, nrow: int | None = None, pad: int = 2,
              scale: int | None = None) -> Path:
    """Save uint8 NHWC images as one PNG grid (atomic); see :func:`grid_image`.  Returns the path."""
    buf = io.BytesIO()
    grid_image(images, nrow=nrow, pad=pad, scale=scale).save(buf, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def save_pngs(images: np.ndarray, folder: str | os.PathLike, labels: np.ndarray | None = None,
              start: int = 0) -> list[Path]:
    """One PNG per image, named ``{index:06d}.png`` (``{index:06d}_{label}.png`` when labels are given,
    the original's label-prefix convention reversed so files sort by index).  Returns the paths."""
    images = _check_nhwc(images)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, img in enumerate(images):
        idx = start + i
        name = f"{idx:06d}_{int(labels[i])}.png" if labels is not None else f"{idx:06d}.png"
        p = folder / name
        atomic_write_bytes(p, _png_bytes(img))
        out.append(p)
    return out


def save_trajectory(frames: np.ndarray, path: str | os.PathLike, fmt: str | None = None,
                    scale: int | None = None, duration_ms: int = 120) -> Path:
    """Save a denoising trajectory.

    ``frames``: uint8 (F, n, H, W, C): F frames from x_T (first) to the final sample (last) for n samples.
    ``fmt="strip"`` (PNG): one row per sample, frames left to right.  ``fmt="gif"``: an animated GIF whose
    frame f is the row of all n samples at frame f.  Default: from the path's suffix (.gif -> gif).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 5:
        raise ValueError(f"expected uint8 frames (F, n, H, W, C), got {frames.dtype} {frames.shape}")
    path = Path(path)
    fmt = fmt or ("gif" if path.suffix.lower() == ".gif" else "strip")
    f, n, h, w, c = frames.shape
    s = _auto_scale(h) if scale is None else int(scale)
    if s > 1:
        frames = frames.repeat(s, axis=2).repeat(s, axis=3)
    if fmt == "strip":
        tiles = frames.transpose(1, 0, 2, 3, 4).reshape(n * f, *frames.shape[2:])  # sample-major, frames in a row
        atomic_write_bytes(path, _png_bytes(make_grid(tiles, nrow=f)))
        return path
    if fmt == "gif":
        pics = [_to_pil(make_grid(frames[k], nrow=n)) for k in range(f)]
        pics = pics + [pics[-1]] * 5  # linger on the final sample
        buf = io.BytesIO()
        pics[0].save(buf, format="GIF", save_all=True, append_images=pics[1:], duration=duration_ms, loop=0)
        atomic_write_bytes(path, buf.getvalue())
        return path
    raise ValueError(f"--trajectory {fmt!r}: choose strip or gif")
