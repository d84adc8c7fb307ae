"""The ablation's plots: ``nll.png``, ``fid_vs_steps.png``, ``training_noise.png`` and ``samples.png``."""

from __future__ import annotations

import math
from pathlib import Path

from iddpm.sample import make_grid

NLL_ORDER = ("hybrid_linear", "hybrid_cosine", "simple_cosine", "simple_cosine_small", "vlb_uniform", "vlb_importance")


def write_plots(results: dict, out: Path, sample_grids: dict, sampler_labels: dict) -> list[str]:
    """Write the plots into ``out``; returns their file names.  ``sample_grids``: ``{title: uint8 NHWC}``;
    ``sampler_labels``: ``{sampler key: legend label}``."""
    import matplotlib  # heavy, and only this module draws: imported when plots are written

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, draw in (("nll.png", _nll_plot), ("fid_vs_steps.png", _fid_plot),
                       ("training_noise.png", _noise_plot), ("samples.png", _samples_plot)):
        fig = draw(plt, results, sample_grids, sampler_labels)
        if fig is None:
            continue
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def _nll_plot(plt, results, _grids, _labels):
    """Test NLL by schedule / objective, with standard errors."""
    v, nll = results["variants"], results["nll"]
    names = [n for n in NLL_ORDER if n in nll]
    labels = {n: v[n]["label"] if n in v else "L_simple, cosine, sigma^2=beta~ at eval" for n in names}
    fig, ax = plt.subplots(figsize=(8, 4))
    vals = [nll[n]["bpd"] for n in names]
    errs = [nll[n]["bpd_stderr"] for n in names]
    ax.barh(range(len(names)), vals, xerr=errs, color=["C0", "C1", "C2", "C2", "C3", "C4"][: len(names)])
    ax.set_yticks(range(len(names)), [labels[n] for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("test NLL (bits/dim, lower is better)")
    finite = [x for x in vals if math.isfinite(x)]
    if finite:
        lo, hi = min(finite), max(finite)
        ax.set_xlim(max(0.0, lo - 0.3 * (hi - lo + 0.1)), hi + 0.3 * (hi - lo + 0.1))
    ax.set_title("Schedule and objective (digits 8x8)")
    return fig


def _fid_plot(plt, results, _grids, sampler_labels):
    """FID vs sampling steps per sampler, with the held-out data floor."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in dict.fromkeys(r["sampler"] for r in results["sampling"]):
        rows = sorted((r for r in results["sampling"] if r["sampler"] == key), key=lambda r: r["steps"])
        ax.errorbar([r["steps"] for r in rows], [r["fid"] for r in rows],
                    yerr=[r.get("fid_bootstrap_se", 0.0) for r in rows], marker="o", capsize=3,
                    label=sampler_labels.get(key, key))
    floor = results["fid_reference"]["floor_fid"]
    if math.isfinite(floor):
        ax.axhline(floor, color="gray", ls="--", lw=1, label="held-out digits (floor)")
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("digit-FID vs train split")
    ax.legend(fontsize=7)
    ax.set_title("FID vs sampling steps")
    return fig


def _noise_plot(plt, results, _grids, _labels):
    """Training noise: loss curves (L_vlb uniform vs importance vs L_hybrid) and the gradient noise scale."""
    v = results["variants"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, color in (("hybrid_cosine", "C1"), ("vlb_uniform", "C3"), ("vlb_importance", "C4")):
        if name not in v:
            continue
        c = v[name]["curves"]
        axes[0].plot(c["step"], c["loss"], lw=0.6, color=color, label=v[name]["label"])
        ns = [(p["step"], p["b_simple"] if math.isfinite(p["b_simple"]) else p["b_simple_lower"])
              for p in v[name]["noise_scale"]]
        axes[1].plot([a for a, _ in ns], [b for _, b in ns], marker="o", color=color, label=v[name]["label"])
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("per-step training loss")
    axes[0].legend(fontsize=7)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("gradient noise scale B_simple\n(lower bound where unresolved)")
    axes[1].legend(fontsize=7)
    return fig


def _samples_plot(plt, _results, sample_grids, _labels):
    """A 6x6 grid of the first samples of each (sampler, steps) in ``sample_grids``; None when there are none."""
    if not sample_grids:
        return None
    keys = list(sample_grids)
    fig, axes = plt.subplots(1, len(keys), figsize=(2.4 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        grid = make_grid(sample_grids[key][:36], nrow=6, pad=1, pad_value=0)
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
        ax.set_title(key, fontsize=7)
        ax.axis("off")
    return fig
