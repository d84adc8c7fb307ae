"""One PNG of a training run (``iddpm plot RUN`` / :func:`iddpm.api.plot_run`), from its files alone.

Panels: the training loss (``loss``, ``mse``, ``vb`` of ``metrics.csv``); the loss per quarter of the timesteps
(``loss_q0`` .. ``loss_q3``: t in [0, T/4) .. [3T/4, T), the original's quartile keys); FID against step from
``eval.csv`` (one line per EMA rate with a band of +-1 bootstrap standard error, the best evaluation starred,
precision and recall of the first rate on the right axis); and the latest sample grid (``samples/step_*.png`` of
``--sample_every`` or ``samples/eval_step_*.png`` of the evaluations).  Losses are drawn raw (faint) and as a
running mean; a panel without data says so.  Drawn with matplotlib's object API (no pyplot state).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from iddpm.config import ConfigError
from iddpm.runtime.atomic import atomic_write_bytes

__all__ = ["plot_run", "read_eval_csv", "read_metrics", "latest_grid", "run_directory", "REPORT_FILE"]

REPORT_FILE = "report.png"
_GRID_RE = re.compile(r"^(?:eval_)?step_(\d+)\.png$")
_QUARTERS = ("[0, T/4)", "[T/4, T/2)", "[T/2, 3T/4)", "[3T/4, T)")


def run_directory(run: str | os.PathLike) -> Path:
    """The run directory of ``run``: itself, or the run holding a ``checkpoints/<folder>`` (or a file in one)."""
    p = Path(os.path.expanduser(str(run)))
    if p.is_file():
        p = p.parent
    if p.parent.name == "checkpoints":
        p = p.parent.parent
    if not p.is_dir():
        raise ConfigError(f"RUN {run}: no such folder; give a run directory (the --run_dir of `iddpm train`)")
    return p


def read_eval_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of an ``eval.csv`` (strings; a damaged last line is left out); [] when there is none."""
    p = Path(path)
    if not p.is_file():
        return []
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if (r.get("step") or "").isdigit() and r.get("wall_time")]


def read_metrics(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{column: (steps, values)}`` of a ``metrics.csv``, blank cells left out (evaluation rows hold only
    ``eval/*`` columns, logging rows only the losses)."""
    p = Path(path)
    if not p.is_file():
        return {}
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for col in (rows[0].keys() if rows else ()):
        pairs = [(float(r["step"]), float(r[col])) for r in rows if col != "step" and r.get(col) not in ("", None)]
        if pairs:
            steps, values = np.array(pairs).T
            out[col] = (steps, values)
    return out


def latest_grid(run_dir: str | os.PathLike) -> Path | None:
    """The sample grid of the highest step in ``RUN_DIR/samples`` (training grids before evaluation grids)."""
    folder = Path(run_dir) / "samples"
    found = [(int(m.group(1)), not p.name.startswith("eval_"), p) for p in folder.glob("*.png")
             if (m := _GRID_RE.match(p.name))] if folder.is_dir() else []
    return max(found)[2] if found else None


def _smooth(y: np.ndarray) -> np.ndarray:
    """Running mean over ~1/40 of the points (a trailing window, so the curve does not run ahead of the data)."""
    w = max(1, len(y) // 40)
    if w == 1:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    head = c[1:w] / np.arange(1, w)
    return np.concatenate([head, (c[w:] - c[:-w]) / w])


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _loss_panel(ax, metrics: dict, keys: tuple[str, ...], labels: tuple[str, ...], title: str, colors) -> None:
    drawn = False
    for key, label, color in zip(keys, labels, colors):
        if key not in metrics:
            continue
        x, y = metrics[key]
        ok = np.isfinite(y) & (y > 0)
        if not ok.any():
            continue
        ax.plot(x[ok], y[ok], color=color, alpha=0.25, lw=0.8)
        ax.plot(x[ok], _smooth(y[ok]), color=color, lw=1.6, label=label)
        drawn = True
    if not drawn:
        _empty(ax, f"no {title.lower()} in metrics.csv")
        return
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _num(text: str | None) -> float:
    try:
        return float(text) if text not in ("", None) else math.nan
    except ValueError:
        return math.nan


def _fid_panel(ax, rows: list[dict[str, str]]) -> str:
    """FID vs step per EMA rate; returns a one-line summary for the title ("" without evaluations)."""
    rates = sorted({r["ema_rate"] for r in rows}, key=float)
    if not rates:
        _empty(ax, "no eval.csv (train with --eval_every N)")
        return ""
    summary = ""
    for i, rate in enumerate(rates):
        rs = sorted((r for r in rows if r["ema_rate"] == rate), key=lambda r: int(r["step"]))
        x = np.array([int(r["step"]) for r in rs], dtype=float)
        fid, se = (np.array([_num(r[k]) for r in rs]) for k in ("fid", "fid_se"))
        color = f"C{i}"
        ax.plot(x, fid, "o-", color=color, ms=3, lw=1.5, label=f"FID, EMA {rate}")
        band = np.nan_to_num(se)
        ax.fill_between(x, np.clip(fid - band, 1e-12, None), fid + band, color=color, alpha=0.2, lw=0)
        if np.isfinite(fid).any():
            b = int(np.nanargmin(fid))
            ax.plot(x[b], fid[b], "*", color=color, ms=13, mec="k", mew=0.6)
            if i == 0:
                summary = (f"last FID {fid[-1]:.3g} (EMA {rate}, step {int(x[-1])}), best {fid[b]:.3g} at step "
                           f"{int(x[b])}")
    fids = np.array([_num(r["fid"]) for r in rows])
    fids = fids[np.isfinite(fids) & (fids > 0)]
    if len(fids) and fids.max() > 5 * fids.min():  # early FIDs are orders of magnitude above the late ones
        ax.set_yscale("log")
    first = sorted((r for r in rows if r["ema_rate"] == rates[0]), key=lambda r: int(r["step"]))
    twin = ax.twinx()
    for key, style in (("precision", "--"), ("recall", ":")):
        twin.plot([int(r["step"]) for r in first], [_num(r[key]) for r in first], style, color="0.35", lw=1.2,
                  label=f"{key} (EMA {rates[0]})")
    twin.set_ylim(0, 1.02)
    twin.set_ylabel("precision / recall")
    r0 = first[-1]
    ax.set_title(f"FID vs step ({r0['num_samples']} samples, {r0['sampler']} {r0['steps']} steps; "
                 "band +-1 s.e.)", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("FID")
    ax.grid(True, which="both", alpha=0.3)
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="center right")
    return summary


def _grid_panel(ax, grid: Path | None) -> None:
    if grid is None:
        _empty(ax, "no sample grid (samples/*.png)")
        return
    with Image.open(grid) as im:
        arr = np.asarray(im.convert("RGB"))
    ax.imshow(arr, interpolation="antialiased")  # a grid larger than the panel: no aliasing of its borders
    ax.set_title(f"latest samples: {grid.name}", fontsize=10)
    ax.axis("off")


def plot_run(run: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the report PNG of a run (see the module docstring) to ``out`` (default ``RUN_DIR/report.png``),
    atomically; returns its path.  Needs matplotlib (``pip install 'iddpm[plots]'``; a one-line ConfigError)."""
    try:  # why: an optional dependency (iddpm[plots]), and it takes ~0.5 s to import; only this command uses it
        from matplotlib import ticker
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("iddpm plot: needs matplotlib; pip install 'iddpm[plots]' (or matplotlib)") from None
    run_dir = run_directory(run)
    metrics, rows = read_metrics(run_dir / "metrics.csv"), read_eval_csv(run_dir / "eval.csv")
    if not metrics and not rows:
        raise ConfigError(f"RUN {run}: neither metrics.csv nor eval.csv in {run_dir}; is it an iddpm run directory?")
    fig = Figure(figsize=(13, 9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    _loss_panel(axes[0, 0], metrics, ("loss", "mse", "vb"), ("loss (total)", "mse", "vb"), "Training loss",
                ("k", "C0", "C1"))
    _loss_panel(axes[0, 1], metrics, tuple(f"loss_q{q}" for q in range(4)),
                tuple(f"loss, t in {q}" for q in _QUARTERS), "Loss by quarter of t", ("C3", "C1", "C2", "C0"))
    summary = _fid_panel(axes[1, 0], rows)
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    for ax in axes.flat:
        if not ax.lines:  # an empty panel keeps no ticks
            continue
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # steps are whole numbers
        if ax.get_yscale() == "log":  # 0.2, 0.5, 1, 2 rather than 2 x 10^-1
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    _grid_panel(axes[1, 1], latest_grid(run_dir))
    last = int(max((xs[0][-1] for xs in metrics.values()), default=0)) if metrics else 0
    fig.suptitle(f"{run_dir.name}: step {last}" + (f"; {summary}" if summary else ""), fontsize=12)
    path = Path(out) if out is not None else run_dir / REPORT_FILE
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path
