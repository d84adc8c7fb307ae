"""Generation loops around a diffusion: ancestral (``p_sample``), DDIM (``ddim_sample``) or a few-step solver.

:func:`generate` is the batch-size-invariant sampler used by ``iddpm sample`` / ``iddpm upsample`` and
:func:`iddpm.api.sample`.  It runs the same steps as the original's ``p_sample_loop`` /
``ddim_sample_loop`` (t = T-1 .. 0, one ``p_sample`` / ``ddim_sample`` call per step), but every random
draw comes from the sample's own stream (:mod:`iddpm.sample.noise`), so the images of a seed do not
depend on the batch size.  (Every sample sees exactly the same noise whatever the batching; what remains is
the network's own float32 round-off, which can differ by ~1e-6 between batch shapes and, rarely, moves a
uint8 value by 1.  The same batch size on the same machine reproduces bit for bit.)  The few-step solvers
(:mod:`iddpm.diffusion.solvers`: DPM-Solver++, UniPC) start from the same x_T draw and take the SDE solver's
noise from the same streams.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from iddpm.config import ConfigError
from iddpm.config.commands import SAMPLERS
from iddpm.diffusion.solvers import SOLVERS, solve
from iddpm.sample.noise import PerSampleNoise
from iddpm.sample.output import grid_image, save_grid, save_npz, to_uint8

__all__ = ["SampleResult", "generate", "gather_results", "resolve_labels", "trajectory_frame_steps"]


@dataclass
class SampleResult:
    """What :func:`generate` returns.

    images: uint8 (N, H, W, C) in 0..255 (the original's ``arr_0``).
    labels: int64 (N,) class labels, or None for unconditional models (the original's ``arr_1``).
    samples: float32 (N, C, H, W) final samples in [-1, 1] before quantisation (only with ``return_float``).
    trajectory: uint8 (F, n, H, W, C): F frames (x_T first, final sample last) of the first n samples
        (only with ``return_trajectory``); ``trajectory_steps`` lists, per frame, the diffusion step index t
        whose output it shows (``T`` for x_T); for a solver, the solver steps left (``steps`` for x_T, 0 for
        the final sample).
    indices: int64 (N,) global sample index of each row (``arange(N)`` unless this is one rank's share of a
        distributed run; :func:`gather_results` merges the shares).
    """

    images: np.ndarray
    labels: np.ndarray | None = None
    samples: np.ndarray | None = None
    trajectory: np.ndarray | None = None
    trajectory_steps: list[int] | None = None
    indices: np.ndarray | None = None
    trajectory_indices: np.ndarray | None = None
    seconds: float = 0.0  # wall time of the sampling (set by iddpm.api.sample / upsample)
    info: dict | None = None  # the settings used, as written to sample_info.json (iddpm.api)
    files: list[Path] | None = None  # what iddpm.api wrote with save=True (the npz first)
    nfe: int = 0  # model evaluations per sample (the steps of the loop or solver)

    def grid(self, nrow: int | None = None, max_images: int = 64, scale: int | None = None):
        """The first ``max_images`` images as one ``PIL.Image`` grid (displays inline in notebooks)."""
        return grid_image(self.images[:max_images], nrow=nrow, scale=scale)

    def save(self, folder, grid: bool = True) -> Path:
        """Write the original's ``samples_{N}x{H}x{W}x{C}.npz`` (+ ``grid.png``) into ``folder``; returns the npz."""
        path = save_npz(folder, self.images, self.labels)
        if grid:
            save_grid(self.images[:64], Path(folder) / "grid.png")
        return path


def gather_results(parts: Sequence[SampleResult]) -> SampleResult:
    """Merge the per-rank results of a distributed :func:`generate` (any order) into one, by global index."""
    parts = [p for p in parts if p is not None]
    idx = np.concatenate([p.indices for p in parts])
    order = np.argsort(idx, kind="stable")

    def cat(name, axis=0, index_name="indices"):
        arrays = [getattr(p, name) for p in parts]
        if any(a is None for a in arrays):
            return None
        merged = np.concatenate(arrays, axis=axis)
        pos = np.argsort(np.concatenate([getattr(p, index_name) for p in parts]), kind="stable")
        return np.take(merged, pos, axis=axis)

    out = SampleResult(images=cat("images"), labels=cat("labels"), samples=cat("samples"), indices=idx[order],
                       nfe=max(p.nfe for p in parts))
    if parts[0].trajectory is not None:
        out.trajectory = cat("trajectory", axis=1, index_name="trajectory_indices")
        out.trajectory_steps = parts[0].trajectory_steps
        out.trajectory_indices = np.sort(np.concatenate([p.trajectory_indices for p in parts]))
    return out


def resolve_labels(classes, num_samples: int, num_classes: int | None, seed: int = 0) -> np.ndarray | None:
    """Class labels (int64 (num_samples,)) for a class-conditional model, or None when ``num_classes`` is None.

    ``classes``: None -> uniform random labels drawn from ``seed`` (like the original's ``randint``, but
    independent of the batch size); an int K -> all K; ``"balanced"`` -> ``arange(N) % num_classes``;
    a sequence of N ints -> as given.
    """
    if num_classes is None:
        if classes is not None:
            raise ConfigError("--class/--balanced: the model is not class-conditional (trained without --class_cond)")
        return None
    if classes is None:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1ABE1]))
        labels = rng.integers(0, num_classes, size=num_samples, dtype=np.int64)
    elif isinstance(classes, str):
        if classes != "balanced":
            raise ConfigError(f"classes={classes!r}: use an int class, 'balanced', a list of labels or None")
        labels = np.arange(num_samples, dtype=np.int64) % num_classes
    elif isinstance(classes, (int, np.integer)):
        labels = np.full(num_samples, int(classes), dtype=np.int64)
    else:
        labels = np.asarray(list(classes), dtype=np.int64)
        if labels.shape != (num_samples,):
            raise ConfigError(f"classes: got {labels.shape[0]} labels for {num_samples} samples")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(f"--class {int(labels.max() if labels.max() >= num_classes else labels.min())}: "
                          f"out of range; the model has classes 0..{num_classes - 1}")
    return labels


def trajectory_frame_steps(num_timesteps: int, num_frames: int) -> list[int]:
    """Which states a trajectory shows: ``T`` (x_T) and then outputs of steps t (descending, ending at 0)."""
    num_frames = max(2, min(int(num_frames), num_timesteps + 1))
    picks = np.linspace(num_timesteps, 0, num_frames)
    steps = sorted({int(round(p)) for p in picks}, reverse=True)
    return steps


def _check_method(sampler: str, use_ddim: bool, steps: int, schedule: str, num_timesteps: int) -> tuple[str, int]:
    """``(sampler, steps)`` resolved (``""`` -> ancestral / ddim; a solver's steps 0 -> T); ValueError otherwise."""
    sampler = sampler or ("ddim" if use_ddim else "ancestral")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not known; choose one of {', '.join(SAMPLERS)}")
    if use_ddim and sampler != "ddim":
        raise ValueError(f"use_ddim=True contradicts sampler={sampler!r}")
    if sampler in SOLVERS:
        return sampler, steps or num_timesteps
    if steps and steps != num_timesteps:
        raise ValueError(f"steps={steps}: {sampler} steps the (respaced) diffusion's {num_timesteps} timesteps; "
                         f"respace it (timestep_respacing={steps!r}) instead")
    if schedule:
        raise ValueError(f"schedule={schedule!r} is only for the solvers ({', '.join(SOLVERS)})")
    return sampler, num_timesteps


def _loop_batch(diffusion, model, x, noise: PerSampleNoise, record, *, sampler, eta, clip_denoised, model_kwargs,
                **_):
    """The diffusion's own progressive loop (t = T-1 .. 0) from ``x``, every step's noise drawn from the samples'
    streams through the loops' ``step_noise`` seam; ``record(t, x_t-1)`` per step (``record(T, x_T)`` first).
    Returns ``(final sample, model evaluations per sample)``."""
    use_ddim = sampler == "ddim"
    loop = diffusion.ddim_sample_loop_progressive if use_ddim else diffusion.p_sample_loop_progressive
    kwargs = dict(eta=eta) if use_ddim else {}
    T = diffusion.num_timesteps
    record(T, x)
    outputs = loop(model, tuple(x.shape), noise=x, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
                   device=x.device, step_noise=noise.stream(), **kwargs)
    for k, out in enumerate(outputs):
        x = out["sample"]
        record(T - 1 - k, x)
    return x, T


def _solver_batch(diffusion, model, x, noise: PerSampleNoise, record, *, sampler, steps, schedule, clip_denoised,
                  model_kwargs, **_):
    """A few-step solver (:func:`iddpm.diffusion.solvers.solve`) on the full diffusion from x_T = ``x``; the SDE
    solver's noise comes from the samples' streams (``noise.draw_like``).  ``record(k, state)`` with k = solver
    steps left: x_T (k = steps), the point each model evaluation saw, and the final data prediction (k = 0).
    Returns ``(final sample, model evaluations per sample)``."""
    record(steps, x)

    def seen(state: dict) -> None:
        if state["i"] > 0:
            record(steps - state["i"], state["x"])

    out = solve(model, diffusion, x, sampler=sampler, steps=steps, schedule=schedule or None,
                clip_denoised=clip_denoised, model_kwargs=model_kwargs, noise_like=noise.draw_like, callback=seen)
    record(0, out.sample)
    return out.sample, out.nfe


def _batch_kwargs(idx: np.ndarray, labels, model_kwargs_fn, device) -> dict:
    kwargs = {}
    if model_kwargs_fn is not None:
        kwargs.update({k: v.to(device) for k, v in model_kwargs_fn(idx).items()})
    if labels is not None:
        kwargs["y"] = torch.as_tensor(labels[idx], device=device)
    return kwargs


@torch.no_grad()
def generate(
    model: Callable,
    diffusion,
    *,
    num_samples: int,
    batch_size: int,
    image_shape: Sequence[int],
    seed: int = 0,
    use_ddim: bool = False,
    eta: float = 0.0,
    sampler: str = "",
    steps: int = 0,
    schedule: str = "",
    clip_denoised: bool = True,
    classes=None,
    num_classes: int | None = None,
    model_kwargs_fn: Callable[[np.ndarray], dict] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    return_trajectory: bool = False,
    trajectory_samples: int = 8,
    trajectory_frames: int = 10,
    return_float: bool = False,
    x_T: torch.Tensor | np.ndarray | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> SampleResult:
    """Draw ``num_samples`` images from ``model`` with ``diffusion`` (any respacing), batch by batch.

    model: callable ``model(x[N,C,H,W], t[N], **model_kwargs) -> [N, C or 2C, H, W]`` (in eval mode).
    image_shape: (C, H, W) of one sample.
    seed: sample i's noise (x_T and every step) comes from its own stream seeded by (seed, i), so the
        images do not depend on ``batch_size``.
    use_ddim / eta: DDIM steps (``ddim_sample``) instead of ancestral ``p_sample``; eta 0 is deterministic.
    sampler / steps / schedule: ``""`` (ancestral, or DDIM with ``use_ddim``), ``"ancestral"``, ``"ddim"`` (the
        diffusion's loops over its own, possibly respaced, timesteps; ``steps`` must be 0 or that count), or a
        solver of :data:`~iddpm.diffusion.solvers.SOLVERS` on the FULL diffusion with ``steps`` model evaluations
        (0 = T) on the grid ``schedule`` (``""`` = the solver's default); x_T is the same draw of each sample's
        stream as for the loops, and the SDE solver's noise comes from the same streams (batch-size invariant).
    classes / num_classes: see :func:`resolve_labels`; labels are passed to the model as ``y``
        (num_classes None = unconditional model).
    model_kwargs_fn: ``fn(indices int64 (n,)) -> dict of tensors (n, ...)`` of extra model inputs for the
        samples with those global indices (e.g. ``low_res`` for super-resolution); moved to ``device``.
    x_T: optional float (N, C, H, W) starting noise replacing the seeded x_T (e.g. a reference's).
    rank / world_size: distributed sampling; this process runs batches rank, rank + world_size, ... and
        returns its share (merge the shares with :func:`gather_results`: the images are those of one process).
    Returns :class:`SampleResult` (uint8 NHWC images as the original's ``((x+1)*127.5).clamp(0,255)``; ``nfe`` the
    model evaluations per sample; trajectory frames of a solver are labelled by the solver steps left).
    """
    if num_samples < 1:
        raise ValueError("num_samples must be >= 1")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    sampler, n = _check_method(sampler, use_ddim, steps, schedule, diffusion.num_timesteps)
    run_batch = functools.partial(_solver_batch if sampler in SOLVERS else _loop_batch, diffusion, model,
                                  sampler=sampler, steps=n, schedule=schedule, eta=eta, clip_denoised=clip_denoised)
    image_shape = tuple(int(s) for s in image_shape)
    device = torch.device(device)
    labels = resolve_labels(classes, num_samples, num_classes, seed)
    if x_T is not None:
        x_T = torch.as_tensor(x_T, dtype=torch.float32)
        if tuple(x_T.shape) != (num_samples, *image_shape):
            raise ValueError(f"x_T shape {tuple(x_T.shape)} != {(num_samples, *image_shape)}")
    frame_steps = trajectory_frame_steps(n, trajectory_frames) if return_trajectory else []
    n_traj = min(trajectory_samples, num_samples) if return_trajectory else 0
    traj: dict[int, list[np.ndarray]] = {s: [] for s in frame_steps}

    # batch b (samples [b*batch_size, (b+1)*batch_size)) runs on rank b % world_size
    starts = list(range(0, num_samples, batch_size))[rank::world_size]
    images, floats, indices, nfe = [], [], [], n
    bar = tqdm(total=len(starts) * n, disable=not progress, desc="sampling", unit="step", leave=False)
    try:
        for start in starts:
            idx = np.arange(start, min(start + batch_size, num_samples), dtype=np.int64)
            noise = PerSampleNoise(seed, idx.tolist(), image_shape, device)
            x = noise.draw()  # always drawn first so the step noise stream is the same with a given x_T
            if x_T is not None:
                x = x_T[idx].to(device)
            keep = max(0, min(n_traj - start, len(idx)))

            def record(k: int, state: torch.Tensor, keep=keep) -> None:
                if keep and k in traj:
                    traj[k].append(to_uint8(state[:keep]))
                if k < n:
                    bar.update(1)

            x, nfe = run_batch(x, noise, record, model_kwargs=_batch_kwargs(idx, labels, model_kwargs_fn, device))
            images.append(to_uint8(x))
            indices.append(idx)
            if return_float:
                floats.append(x.float().cpu().numpy())
    finally:
        bar.close()
    return _result(images, floats, indices, labels, image_shape, nfe, return_float,
                   (frame_steps, traj, n_traj) if return_trajectory else None)


def _result(images, floats, indices, labels, image_shape, nfe, return_float, trajectory) -> SampleResult:
    """The :class:`SampleResult` of :func:`generate`'s per-batch outputs."""
    h, w = image_shape[1:]
    idx_all = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    result = SampleResult(
        images=np.concatenate(images) if images else np.zeros((0, h, w, image_shape[0]), np.uint8),
        labels=None if labels is None else labels[idx_all],
        indices=idx_all,
        nfe=int(nfe),
    )
    if return_float:
        result.samples = np.concatenate(floats) if floats else np.zeros((0, *image_shape), np.float32)
    if trajectory is not None:
        frame_steps, traj, n_traj = trajectory
        empty = np.zeros((0, h, w, image_shape[0]), np.uint8)
        result.trajectory = np.stack([np.concatenate(traj[s]) if traj[s] else empty for s in frame_steps])
        result.trajectory_steps = frame_steps
        result.trajectory_indices = idx_all[idx_all < n_traj]
    return result
