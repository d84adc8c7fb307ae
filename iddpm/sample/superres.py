"""Super-resolution sampling from base samples, as the original's ``super_res_sample.py``.

The base samples (uint8 NHWC, e.g. ``arr_0`` of a 64x64 samples npz) become the model's ``low_res``
input scaled to [-1, 1] NCHW (``x / 127.5 - 1``); for class-conditional models the base labels
(``arr_1``) are passed as ``y``.  The super-res U-Net resizes ``low_res`` to the output size itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from iddpm.config import ConfigError, ModelConfig, RunConfig
from iddpm.sample.loop import SampleResult, generate
from iddpm.sample.output import load_npz

__all__ = ["low_res_from_uint8", "upsample", "base_images", "check_superres_inputs"]


def low_res_from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]: ``x / 127.5 - 1`` like the original."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1
    return x.permute(0, 3, 1, 2).contiguous()


def upsample(
    model: Callable,
    diffusion,
    base_images: np.ndarray,
    *,
    large_size: int,
    base_labels: np.ndarray | None = None,
    class_cond: bool = False,
    num_classes: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    use_ddim: bool = False,
    eta: float = 0.0,
    sampler: str = "",
    steps: int = 0,
    schedule: str = "",
    clip_denoised: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = True,
    return_trajectory: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> SampleResult:
    """Super-resolve every base image; returns uint8 (N, large_size, large_size, C) images (+ the base labels).

    base_images: uint8 (N, h, w, C) with h = w = the model's small_size.
    class_cond: pass ``base_labels`` as ``y`` (required then); ``num_classes`` is the model's class count.
    sampler / steps / schedule: as :func:`iddpm.sample.generate` (a solver needs the full, unrespaced diffusion).
    rank / world_size: this process's share of a distributed run (see :func:`iddpm.sample.generate`).
    """
    base_images = np.asarray(base_images)
    low_res = low_res_from_uint8(base_images)
    if class_cond and base_labels is None:
        raise ConfigError("--base_samples: the super-res model is class-conditional but the npz has no arr_1 labels")
    labels = None if base_labels is None else np.asarray(base_labels, dtype=np.int64)

    def kwargs_fn(idx: np.ndarray) -> dict:
        return {"low_res": low_res[torch.from_numpy(idx)]}

    channels = base_images.shape[-1]
    result = generate(
        model, diffusion, num_samples=len(base_images), batch_size=batch_size,
        image_shape=(channels, large_size, large_size), seed=seed, use_ddim=use_ddim, eta=eta,
        sampler=sampler, steps=steps, schedule=schedule, clip_denoised=clip_denoised,
        classes=labels if class_cond else None,
        num_classes=(num_classes or int(labels.max()) + 1) if class_cond else None,
        model_kwargs_fn=kwargs_fn, device=device, progress=progress, return_trajectory=return_trajectory,
        rank=rank, world_size=world_size,
    )
    if labels is not None:
        result.labels = labels[result.indices]
    return result


def base_images(base_samples) -> tuple[np.ndarray, np.ndarray | None]:
    """Base samples as ``(uint8 (N, h, w, C), labels or None)``: an npz path, an array or an (images, labels) pair."""
    if isinstance(base_samples, (str, os.PathLike)):
        return load_npz(base_samples)
    if isinstance(base_samples, tuple):
        return np.asarray(base_samples[0]), base_samples[1]
    return np.asarray(base_samples), None


def check_superres_inputs(cfg: RunConfig, images: np.ndarray, labels, flag: str, run) -> ModelConfig:
    """One-line errors for a model that is not super-resolution, base images of the wrong size, or labels out of
    range; returns the model settings."""
    m = cfg.model
    if not m.super_res:
        raise ConfigError(f"--run {run}: not a super-resolution model (trained without --small_size); "
                          "use `iddpm sample`")
    if images.ndim != 4 or images.shape[1:] != (m.small_size, m.small_size, m.in_channels):
        shape = "x".join(str(s) for s in images.shape[1:])
        raise ConfigError(f"{flag}: images are {shape}, the model upsamples "
                          f"{m.small_size}x{m.small_size}x{m.in_channels}")
    if m.class_cond and labels is not None and labels.size and labels.max() >= m.num_classes:
        raise ConfigError(f"{flag}: label {int(labels.max())} is out of range for a model with {m.num_classes} "
                          "classes")
    return m
