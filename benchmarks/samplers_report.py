"""Summary, targets, tables and plot of ``benchmarks/samplers.py`` (the measurements come in as plain dicts).

Standard errors are over seeds (``std(ddof=1) / sqrt(n)``); a comparison between two samplers uses the per-seed
differences (sample i of seed s starts from the same x_T for every sampler), and a difference is called one only
beyond two standard errors.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only; no display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)

# The issue's targets: at this NFE, FID at most FACTOR x the best ancestral FID at any step count.
TARGETS = ((10, 1.5), (20, 1.15))
DETERMINISTIC = ("ddim", "ddim-ode", "dpm++2m", "dpm++3m", "unipc")


def _mean_se(values) -> tuple[float, float]:
    v = np.asarray(list(values), dtype=np.float64)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), se


def summarise(raw: list[dict]) -> list[dict]:
    """One row per (method, NFE): mean and standard error of FID and of seconds per 1000 samples over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in raw:
        groups[(r["label"], r["sampler"], r["schedule"], r["nfe"])].append(r)
    rows = []
    for (label, sampler, schedule, nfe), rs in groups.items():
        fid, fid_se = _mean_se(r["fid"] for r in rs)
        sec, sec_se = _mean_se(r["s_per_1000"] for r in rs)
        rows.append(dict(label=label, sampler=sampler, schedule=schedule, nfe=nfe, n_seeds=len(rs), fid=fid,
                         fid_se=fid_se, s_per_1000=sec, s_per_1000_se=sec_se,
                         fid_by_seed={str(r["seed"]): r["fid"] for r in rs}))
    return sorted(rows, key=lambda r: (r["label"], r["nfe"]))


def paired(a: dict, b: dict, factor: float = 1.0) -> tuple[float, float]:
    """Mean and standard error over common seeds of ``FID_a - factor * FID_b``."""
    seeds = sorted(set(a["fid_by_seed"]) & set(b["fid_by_seed"]))
    return _mean_se(a["fid_by_seed"][s] - factor * b["fid_by_seed"][s] for s in seeds)


def verdict(diff: float, se: float, lower_is_better: str = "meets", higher: str = "misses") -> str:
    """``meets`` (diff <= 0), ``misses`` beyond 2 SE, else ``misses within noise``."""
    if diff <= 0:
        return lower_is_better
    return f"{higher} within noise" if math.isfinite(se) and diff <= 2 * se else higher


def best_ancestral(summary: list[dict]) -> dict | None:
    anc = [r for r in summary if r["sampler"] == "ancestral"]
    return min(anc, key=lambda r: r["fid"]) if anc else None


def targets(summary: list[dict]) -> list[dict]:
    """Per method and target NFE: FID, ratio to the best ancestral, target value, paired difference, verdict."""
    best = best_ancestral(summary)
    out = []
    if best is None:
        return out
    for nfe, factor in TARGETS:
        for r in (r for r in summary if r["nfe"] == nfe):
            d, se = paired(r, best, factor)
            out.append(dict(label=r["label"], nfe=nfe, factor=factor, fid=r["fid"], fid_se=r["fid_se"],
                            s_per_1000=r["s_per_1000"], ratio=r["fid"] / best["fid"], target=factor * best["fid"],
                            diff=d, diff_se=se, verdict=verdict(d, se)))
    return out


def against_ancestral(summary: list[dict]) -> list[dict]:
    """Every deterministic solver against learned-variance ancestral sampling at the same NFE (paired)."""
    anc = {r["nfe"]: r for r in summary if r["sampler"] == "ancestral"}
    out = []
    for r in summary:
        if r["sampler"] in DETERMINISTIC and r["nfe"] in anc:
            a = anc[r["nfe"]]
            d, se = paired(r, a)
            beyond = math.isfinite(se) and abs(d) > 2 * se
            word = ("loses" if d > 0 else "wins") if beyond else "within noise"
            out.append(dict(label=r["label"], nfe=r["nfe"], diff=d, diff_se=se, percent=100 * d / a["fid"],
                            outcome=word))
    return out


def _fmt(v: float, se: float, digits: int = 3) -> str:
    return f"{v:.{digits}f} ± {se:.{digits}f}" if math.isfinite(se) else f"{v:.{digits}f}"


def _grid_table(summary: list[dict], T: int) -> list[str]:
    nfes = sorted({r["nfe"] for r in summary})
    labels = list(dict.fromkeys(r["label"] for r in sorted(summary, key=lambda r: _order(r))))
    cell = {(r["label"], r["nfe"]): r for r in summary}
    head = [f"{n}" + (" (full T)" if n == T else "") for n in nfes]
    lines = ["| sampler | " + " | ".join(head) + " |", "|---|" + "---|" * len(nfes)]
    for lab in labels:
        cells = []
        for n in nfes:
            r = cell.get((lab, n))
            cells.append("" if r is None else f"{_fmt(r['fid'], r['fid_se'])} · {r['s_per_1000']:.1f} s")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return lines


def _order(r: dict) -> tuple:
    names = ("ancestral", "ddim", "dpm++2m", "dpm++3m", "dpm++2m-sde", "unipc", "ddim-ode")
    return (names.index(r["sampler"]) if r["sampler"] in names else 99, r["schedule"] != "logsnr", r["label"])


def _target_table(summary: list[dict]) -> list[str]:
    best = best_ancestral(summary)
    if best is None:
        return ["(no ancestral entry: targets not evaluated)"]
    lines = [f"Best ancestral FID at any step count: **{_fmt(best['fid'], best['fid_se'])}** at {best['nfe']} steps "
             f"({best['s_per_1000']:.1f} s per 1000 samples).", ""]
    rows = targets(summary)
    if not rows:
        return lines + [f"(nothing measured at {' or '.join(str(n) for n, _ in TARGETS)} NFE)"]
    by = {(r["label"], r["nfe"]): r for r in rows}
    labels = list(dict.fromkeys(r["label"] for r in sorted(summary, key=_order) if (r["label"], r["nfe"]) in by))
    head = " | ".join(f"{n} NFE: FID (x best) · s/1000 | <= {f}x = {f * best['fid']:.3f}" for n, f in TARGETS)
    lines += [f"| sampler | {head} |", "|---|" + "---|---|" * len(TARGETS)]
    for lab in labels:
        cells = []
        for n, _ in TARGETS:
            r = by.get((lab, n))
            if r is None:
                cells += ["", ""]
                continue
            cells += [f"{_fmt(r['fid'], r['fid_se'])} ({r['ratio']:.2f}x) · {r['s_per_1000']:.1f} s",
                      f"{r['verdict']} ({r['diff']:+.3f} ± {r['diff_se']:.3f})"]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return lines


def _versus_lines(summary: list[dict]) -> list[str]:
    rows = against_ancestral(summary)
    if not rows:
        return ["(no deterministic solver measured beside ancestral sampling)"]
    nfes = sorted({r["nfe"] for r in rows})
    by = {(r["label"], r["nfe"]): r for r in rows}
    labels = list(dict.fromkeys(r["label"] for r in sorted(summary, key=_order) if r["sampler"] in DETERMINISTIC))
    lines = ["| sampler | " + " | ".join(f"{n} NFE" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for lab in labels:
        cells = [("" if (lab, n) not in by else
                  f"{by[lab, n]['diff']:+.3f} ± {by[lab, n]['diff_se']:.3f} ({by[lab, n]['outcome']})") for n in nfes]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    losses = [r for r in rows if r["outcome"] == "loses"]
    lines.append("")
    if losses:
        lines.append("Where a deterministic solver loses to learned-variance ancestral sampling at equal NFE "
                     "(beyond 2 standard errors):")
        lines += [f"- {r['label']} at {r['nfe']} NFE: FID higher by {r['diff']:.3f} ± {r['diff_se']:.3f} "
                  f"({r['percent']:+.0f}% of ancestral's)" for r in losses]
    else:
        lines.append("No deterministic solver loses to learned-variance ancestral sampling at equal NFE beyond 2 "
                     "standard errors.")
    return lines


def _grids_measured(summary: list[dict]) -> str:
    """``dpm++2m: uniform, logsnr, karras; unipc: logsnr`` (the solver's default grid is logsnr here)."""
    grids: dict[str, list[str]] = defaultdict(list)
    for r in sorted(summary, key=_order):
        if r["schedule"] and r["schedule"] not in grids[r["sampler"]]:
            grids[r["sampler"]].append(r["schedule"])
    return "; ".join(f"{s}: {', '.join(g)}" for s, g in grids.items()) or "(none)"


def markdown(meta: dict, summary: list[dict], T: int) -> str:
    m, run = meta["machine"], meta["run"]
    budget = f", {run['train_steps']} training steps" if "train_steps" in run else ""
    dcfg = run["config"]["diffusion"]
    load = f"load average {m['load_avg_at_start']} at start, {m['load_avg_at_end']} at end"
    lines = [
        "# Few-step samplers on a digits model: digit-FID and wall time vs NFE", "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, shared with other jobs ({load}); torch {m['torch']} on "
        f"{m['torch_threads']} thread(s); total wall time {meta['wall_seconds'] / 60:.1f} min.  ",
        f"Run: `{run['path']}` ({run['source']}{budget}), T = {T}, {dcfg['noise_schedule']} schedule, learned "
        f"sigmas {dcfg['learn_sigma']}.  ",
        f"Each entry: mean over seeds {meta['seeds']} of the digit-FID of {meta['num_samples']} samples against the "
        f"360 test digits (shipped digits CNN), ± its standard error over seeds, then seconds per 1000 samples "
        f"(batch {meta['batch_size']}). Data floor ({meta['num_samples']} real train digits vs the test digits): "
        f"{meta['data_floor_fid']:.3f}.", "",
        "Samplers: ancestral = the learned-variance `p_sample` loop on the respaced diffusion "
        "(`timestep_respacing=N`); ddim = eta 0 on the respacing N (`--sampler ddim --steps N`: evenly spaced from "
        "T-1 to 0); the solvers step the full diffusion (`--sampler S --steps N`) on the step grids "
        f"{_grids_measured(summary)}. Sample i of seed s starts from the same "
        "x_T for every sampler, so comparisons use paired per-seed differences; a difference is called one only "
        "beyond two standard errors.", "",
        "## digit-FID ± SE · seconds per 1000 samples, by NFE (model evaluations per sample)", "",
        *_grid_table(summary, T), "",
        "## The issue's targets: at 10 NFE FID <= 1.5x, at 20 NFE <= 1.15x the best ancestral FID", "",
        *_target_table(summary), "",
        "Verdict: `meets` = FID <= target; `misses within noise` = above it by at most 2 SE of the paired "
        "difference FID - factor x best (given in brackets); `misses` = beyond that.", "",
        "## Deterministic solvers minus learned-variance ancestral sampling at equal NFE (FID, paired)", "",
        *_versus_lines(summary), "",
    ]
    return "\n".join(lines)


def plot(path: Path, summary: list[dict], T: int) -> None:
    """FID vs NFE (log x) with standard-error bars per method, and FID vs seconds per 1000 samples."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    labels = list(dict.fromkeys(r["label"] for r in sorted(summary, key=_order)))
    for lab in labels:
        rs = sorted((r for r in summary if r["label"] == lab), key=lambda r: r["nfe"])
        x, y = [r["nfe"] for r in rs], [r["fid"] for r in rs]
        e = [0 if not math.isfinite(r["fid_se"]) else r["fid_se"] for r in rs]
        ax.errorbar(x, y, yerr=e, marker="o", ms=3, capsize=3, label=lab)
        bx.errorbar([r["s_per_1000"] for r in rs], y, yerr=e, marker="o", ms=3, capsize=3, label=lab)
    best = best_ancestral(summary)
    if best is not None:
        for a in (ax, bx):
            a.axhline(best["fid"], color="gray", ls=":", lw=1, label=f"best ancestral ({best['nfe']} steps)")
        for n, f in TARGETS:
            ax.plot([n], [f * best["fid"]], marker="v", color="red", ms=9, ls="none",
                    label=f"target at {n} NFE ({f}x best)")
    ax.set(xscale="log", xlabel=f"NFE (model evaluations per sample; T = {T})", ylabel="digit-FID (lower is better)",
           title="digit-FID vs NFE (± SE over seeds)")
    nfes = sorted({r["nfe"] for r in summary})
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.minorticks_off()
    bx.set(xscale="log", xlabel="seconds per 1000 samples (shared CPU)", ylabel="digit-FID",
           title="digit-FID vs wall time")
    ax.legend(fontsize=7)
    for a in (ax, bx):
        a.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: Path, meta: dict, raw: list[dict], summary: list[dict], T: int) -> list[Path]:
    """results.json, table.md and fid_vs_nfe.png in ``out``; returns their paths."""
    data = dict(meta, summary=summary, targets=targets(summary), against_ancestral=against_ancestral(summary),
                measurements=raw)
    files = [out / "results.json", out / "table.md", out / "fid_vs_nfe.png"]
    files[0].write_text(json.dumps(_finite(data), indent=2) + "\n")
    files[1].write_text(markdown(meta, summary, T))
    plot(files[2], summary, T)
    return files


def _finite(v):
    """``v`` with every non-finite float (a standard error of one seed) replaced by None (valid JSON)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v
