"""The folder ``iddpm sample`` / ``iddpm upsample`` write: the original's npz, a grid, PNGs, trajectory, info."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from iddpm.config import ConfigError, SampleConfig, SourceConfig
from iddpm.runtime.atomic import atomic_write_text
from iddpm.runtime.lock import lock_folder
from iddpm.sample.loop import SampleResult
from iddpm.sample.output import save_grid, save_npz, save_pngs, save_trajectory
from iddpm.sample.plan import SamplingPlan

__all__ = ["check_out_folder", "write_sample_folder", "finish_result"]


def check_out_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse (one-line ConfigError) an output folder that cannot be created: ``path`` or one of its parents is an
    existing file.  Called before any sampling work, so a bad ``--out`` costs nothing; creates nothing."""
    out = Path(path)
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            what = "is an existing file" if p == out else f"lies under {p}, an existing file"
            raise ConfigError(f"{flag} {path}: {what}, not a folder; give a folder name (it is created) or move "
                              "the file away")
    return out


def write_sample_folder(result: SampleResult, out: str | os.PathLike, *, grid_size: int = 64,
                        save_png_files: bool = False, trajectory: str = "",
                        info: dict[str, Any] | None = None) -> list[Path]:
    """Write ``samples_{N}x{H}x{W}x{C}.npz`` (arr_0 uint8 NHWC, arr_1 labels), ``grid.png`` (the first
    ``grid_size`` samples; 0 = none), ``pngs/`` (``save_png_files``), ``trajectory.png|gif`` (when the result has
    one; ``trajectory`` = "strip" or "gif") and ``sample_info.json`` into ``out``; returns the paths written,
    the npz first.  Each file is written atomically, under ``out/.lock`` (:func:`iddpm.runtime.lock.lock_folder`):
    a second process writing the same folder is refused with a one-line error naming the holder."""
    out = Path(out)
    with lock_folder(out, flag="--out"):
        return _write(result, out, grid_size, save_png_files, trajectory, info)


def _write(result: SampleResult, out: Path, grid_size: int, save_png_files: bool, trajectory: str,
           info: dict[str, Any] | None) -> list[Path]:
    written = [save_npz(out, result.images, result.labels)]
    if grid_size > 0:
        written.append(save_grid(result.images[:grid_size], out / "grid.png"))
    if save_png_files:
        save_pngs(result.images, out / "pngs", labels=result.labels)
        written.append(out / "pngs")
    if result.trajectory is not None:
        fmt = "gif" if trajectory == "gif" else "strip"
        written.append(save_trajectory(result.trajectory, out / f"trajectory{'.gif' if fmt == 'gif' else '.png'}",
                                       fmt=fmt))
    if info is not None:
        atomic_write_text(out / "sample_info.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    return written


def finish_result(result: SampleResult, settings: SampleConfig, source: SourceConfig, cfg, diffusion, weights,
            seconds: float, save: bool, plan: SamplingPlan | None = None, **extra: Any) -> SampleResult:
    """Attach timing and the settings used (``sample_info.json``: with ``plan``, also the sampler, its schedule,
    steps and NFE = model evaluations per sample); write the output folder when ``save``."""
    result.seconds = seconds
    nfe = int(result.nfe or diffusion.num_timesteps)
    result.info = {
        "run": source.run, "weights": None if weights is None else str(weights), "use_ema": bool(source.use_ema),
        "num_samples": int(result.images.shape[0]), "batch_size": settings.batch_size, "seed": settings.seed,
        "timestep_respacing": cfg.diffusion.timestep_respacing if cfg is not None else None,
        "num_sampling_steps": nfe, "use_ddim": bool(settings.use_ddim),
        **(plan.info(nfe) if plan is not None else {}),
        "eta": settings.eta, "clip_denoised": bool(settings.clip_denoised), "seconds": round(seconds, 3),
        "guidance_scale": settings.guidance_scale,
        "config": cfg.to_dict() if cfg is not None else None,
        **{k: (v if isinstance(v, (int, str, type(None))) else "given") for k, v in extra.items()},
    }
    if save:
        result.files = write_sample_folder(result, settings.out, grid_size=settings.grid_size,
                                           save_png_files=settings.save_pngs, trajectory=settings.trajectory,
                                           info=result.info)
    return result
