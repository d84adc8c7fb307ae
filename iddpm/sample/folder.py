"""The folder ``iddpm sample`` / ``iddpm upsample`` write: the original's npz, a grid, PNGs, trajectory, info."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from iddpm.config import ConfigError
from iddpm.runtime.atomic import atomic_write_text
from iddpm.runtime.lock import lock_folder
from iddpm.sample.loop import SampleResult
from iddpm.sample.output import save_grid, save_npz, save_pngs, save_trajectory

__all__ = ["check_out_folder", "write_sample_folder"]


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
