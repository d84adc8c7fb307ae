"""The ablation's outputs: ``table.md`` (rendered from the results dict), ``results.json``, ``training_curves.csv``
and the plots (:mod:`ablations_plots`)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ablations_checks import fmt
from ablations_plots import write_plots
from ablations_runs import SAMPLERS
from ablations_stats import median_noise_scale

from iddpm.runtime.atomic import atomic_write_text

PAPER = "Nichol & Dhariwal 2021, Improved Denoising Diffusion Probabilistic Models (arXiv:2102.09672)"


def render_table(results: dict) -> str:
    """``table.md``: settings, the NLL / gradient-noise table, the FID and timing tables, the paper's claims."""
    lines = _header(results) + _nll_section(results) + _sampling_section(results)
    lines += ["## Where the miniature agrees and disagrees with the paper", "",
              f"Paper: {PAPER}. 'within noise' = paired difference within 2 standard errors.", "",
              "| paper's finding | miniature | verdict |", "|---|---|---|"]
    for c in results["checks"]:
        lines.append(f"| {c['claim']} | {c['measured']} | **{c['verdict']}** |")
    lines += ["", "Caveats: 8x8 grayscale digits, a ~0.75M-parameter U-Net and a few minutes of CPU training per "
              "model are far from the paper's 32x32/64x64 images, 100M+ parameters and 500K+ steps at batch 128: "
              "the models here are far from converged (L_vlb, the slowest objective to optimise, suffers most), "
              "and digit-FID on a few hundred samples is a coarse, biased metric that saturates near its data floor "
              "(compare rows at equal sample counts only). Seconds per 1000 samples scale with the number of "
              "network evaluations (one per step for every sampler) and were measured on a CPU shared with other "
              "jobs.", ""]
    wall = results["wall_seconds"]
    lines += ["Wall time per stage (s): " + ", ".join(f"{k} {val:.0f}" for k, val in wall.items()), ""]
    return "\n".join(lines)


def _header(results: dict) -> list[str]:
    s, mach = results["settings"], results["machine"]
    return [
        "# Paper in miniature: Improved DDPM ablations on the bundled 8x8 digits",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {mach['cpu']}, {mach['cores']} cores (torch {mach['torch']}, {mach['torch_threads']} thread(s); "
        "the CPU was shared with other jobs, so timings are noisy), "
        f"total wall time {results['wall_seconds']['total'] / 60:.1f} min.  ",
        f"Budget: {s['steps']} optimizer steps per model at batch {s['batch_size']} "
        f"(lr {s['lr']}, EMA {s['ema_rate']}), "
        f"U-Net {s['num_channels']} channels x {s['num_res_blocks']} res block(s), T = {s['diffusion_steps']}; "
        f"NLL on the first {s['nll_examples']} test digits; {s['num_samples']} samples per FID point; "
        f"seed {s['seed']}.",
        "",
    ]


def _nll_section(results: dict) -> list[str]:
    v, nll = results["variants"], results["nll"]
    lines = ["## 1-2. Schedule and objective: test NLL and gradient noise", "",
             "| model | test NLL (bits/dim) | loss std/mean (2nd half) | grad-norm std/mean (2nd half) "
             "| gradient noise scale B_simple (median of probes) | train wall (s) |",
             "|---|---|---|---|---|---|"]
    for name, rec in v.items():
        n = nll.get(name, {})
        err = f" (stopped: {rec['error'].split(';')[0]})" if rec.get("error") else ""
        if name == "vlb_importance":
            act = rec.get("importance_sampler_active_from_step")
            err += " (sampler never left warm-up = uniform)" if act is None else f" (sampler active from step {act})"
        lines.append(
            f"| {rec['label']}{err} | {fmt(n.get('bpd'))} +- {fmt(n.get('bpd_stderr'))} "
            f"| {fmt(rec['loss_second_half']['cv'])} | {fmt(rec['grad_norm_second_half']['cv'])} "
            f"| {median_noise_scale(rec['noise_scale'])[1]} | {rec['wall_s']:.0f} |")
        if name == "simple_cosine" and "simple_cosine_small" in nll:
            small = nll["simple_cosine_small"]
            lines.append(f"| L_simple, cosine, evaluated with sigma^2=beta~ | {fmt(small['bpd'])} +- "
                         f"{fmt(small['bpd_stderr'])} | | | | |")
    lines += ["", "L_simple is trained with fixed sigma^2 = beta (the original's default, FIXED_LARGE); its NLL is "
              "given with that variance and with sigma^2 = beta~ (FIXED_SMALL). NLL = the full T-step variational "
              "bound (EMA weights); +- is the standard error over test examples; the claims below use paired "
              "differences (same examples, same noise). std/mean of the per-step loss and gradient norm is taken "
              "over the second half of training; B_simple = tr(Sigma)/|G|^2 from independent mini-batches at 25/50/"
              "75/100% of training (the paper's Figure 5 quantity).", ""]
    return lines


def _sampling_section(results: dict) -> list[str]:
    s, ref = results["settings"], results["fid_reference"]
    steps = sorted({r["steps"] for r in results["sampling"]})
    head = " | ".join(f"{k} steps" for k in steps) + " |"
    lines = ["## 3. Sampling steps: digit-FID (lower is better) and seconds per 1000 samples", "",
             f"FID: digits CNN features of {s['num_samples']} samples vs the digits train split "
             f"({ref['num']} images). "
             f"Data floor: {ref['floor_num_test_images']} "
             f"held-out test digits vs the train split = {fmt(ref['floor_fid'], 2)}. "
             f"+- = bootstrap standard error over the samples ({s['fid_bootstrap']} resamples; reference fixed). "
             "Sample i of every sampler starts from the same seeded noise, so the claims below use a paired "
             "bootstrap of the FID difference and call it real only beyond 2 standard errors.", "",
             "| sampler | " + head, "|---|" + "---|" * len(steps)]
    by: dict = {}
    for r in results["sampling"]:
        by.setdefault(r["sampler"], {})[r["steps"]] = r
    labels = {sampler.key: sampler.label for sampler in SAMPLERS}
    for key, rows in by.items():
        lines.append(f"| {labels.get(key, key)} | " + " | ".join(
            f"{fmt(rows[k]['fid'], 2)} +- {fmt(rows[k].get('fid_bootstrap_se'), 2)}" if k in rows else ""
            for k in steps) + " |")
    lines += ["", "| sampler (s / 1000 samples) | " + head, "|---|" + "---|" * len(steps)]
    for key, rows in by.items():
        lines.append(f"| {labels.get(key, key)} | " + " | ".join(
            f"{rows[k]['sec_per_1000_samples']:.1f}" if k in rows else "" for k in steps) + " |")
    return lines + [""]


def training_curves_csv(results: dict) -> str:
    """One row per (variant, step): loss and gradient norm, exactly (``repr``)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "step", "loss", "grad_norm"])
    for name, rec in results["variants"].items():
        c = rec["curves"]
        for s, lo, g in zip(c["step"], c["loss"], c["grad_norm"]):
            w.writerow([name, s, repr(lo), repr(g)])
    return buf.getvalue()


def write_outputs(results: dict, out: Path, sample_grids: dict) -> None:
    """Write ``training_curves.csv``, the plots, ``results.json`` (without curves and per-example NLLs) and
    ``table.md`` into ``out`` (atomically, file by file)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "training_curves.csv", training_curves_csv(results))
    results["plots"] = write_plots(results, out, sample_grids, {sampler.key: sampler.label for sampler in SAMPLERS})
    slim = json.loads(json.dumps(results, default=float))
    for rec in slim["variants"].values():
        rec.pop("curves", None)  # in training_curves.csv
    for rec in slim["nll"].values():
        rec.pop("per_example_bpd", None)
    atomic_write_text(out / "results.json", json.dumps(slim, indent=2, allow_nan=True) + "\n")
    atomic_write_text(out / "table.md", render_table(results))
