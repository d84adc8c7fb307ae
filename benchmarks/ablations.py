"""The paper's ablations in miniature: Improved DDPM's findings re-measured on the bundled 8x8 digits, on a CPU.

Usage::

    python benchmarks/ablations.py                 # default budget (~35-45 min on a shared 2-core CPU)
    python benchmarks/ablations.py --quick         # a few minutes, same stages, smaller budget
    python benchmarks/ablations.py --smoke --out /tmp/abl   # seconds; for the e2e test only

Stages (every step runs iddpm's own code; see :mod:`ablations_runs` for which entry point and why):

1. **Schedule** -- L_hybrid with the linear vs the cosine noise schedule; test-split NLL (bits/dim, the full
   ``T``-step ``calc_bpd_loop`` via :func:`iddpm.api.nll`, EMA weights).
2. **Objective** -- L_simple (fixed variances, MSE) vs L_hybrid (learned variances, RESCALED_MSE) vs L_vlb
   (RESCALED_KL) with uniform and with loss-second-moment (importance-sampled) timesteps, all cosine:
   test NLL, plus the gradient-noise proxies of the paper: the coefficient of variation (std / mean) of the
   per-step loss and of the gradient norm over the second half of training (logged every step), and the
   gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018) measured at 4 points of
   training from ``--noise_batches`` independent mini-batches (the paper's Figure 5 uses this quantity).
3. **Sampling steps** -- respaced ancestral sampling with {25, 50, 100, 250, 1000} steps for the
   fixed-variance L_simple model (sigma^2 = beta, the original's default, and sigma^2 = beta-tilde) and the
   learned-variance L_hybrid model, and DDIM (eta = 0) on the L_simple model at the same step counts:
   digit-FID (the built-in digits CNN, 64-d features) against the digits **train** split (1437 images, what
   the models were trained on) and measured seconds per 1000 samples (:func:`iddpm.api.sample`,
   :func:`iddpm.api.evaluate`).

Determinism: the budget is counted in optimizer steps / examples / samples, never in minutes; every random
draw is seeded from ``--seed`` and torch runs with ``--threads`` intra-op threads (default 1), so the same
command on the same machine gives the same numbers (timings excepted).

Outputs in ``--out`` (default ``benchmarks/results/ablations``): ``table.md``, ``results.json`` (machine,
command, budget, seeds, wall time per stage, every number), ``training_curves.csv`` (per-step loss and
gradient norm of every run) and the plots ``nll.png``, ``fid_vs_steps.png``, ``training_noise.png``,
``samples.png``.  Run directories (checkpoints) go to a temporary folder unless ``--run_root`` is given.

Modules: this file is the command line and the order of the stages; ``ablations_runs`` trains, evaluates and
samples; ``ablations_stats`` holds the benchmark's own statistics (bootstrap errors, noise scale, verdicts);
``ablations_checks`` compares with the paper; ``ablations_report`` / ``ablations_plots`` write the outputs.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from ablations_checks import paper_checks
from ablations_report import PAPER, write_outputs
from ablations_runs import SAMPLERS, VARIANTS, fid_reference, nll_of, sample_and_fid, train_variant
from speed import cpu_model, load_average

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ablations"

MODES = {
    # steps per model, samples per (sampler, steps), NLL test examples, sampling step counts, noise batches
    "default": dict(steps=1000, num_samples=200, nll_examples=128, sample_steps="25,50,100,250,1000",
                    noise_batches=16, batch_size=64, diffusion_steps=1000),
    "quick": dict(steps=200, num_samples=64, nll_examples=32, sample_steps="25,50,100,250",
                  noise_batches=8, batch_size=64, diffusion_steps=1000),
    "smoke": dict(steps=4, num_samples=16, nll_examples=4, sample_steps="5,10", noise_batches=2,
                  batch_size=8, diffusion_steps=50),
}
SETTINGS = ("steps", "batch_size", "lr", "ema_rate", "num_channels", "num_res_blocks", "diffusion_steps",
            "nll_examples", "num_samples", "sample_step_list", "noise_batches", "fid_bootstrap", "seed")


def auto_ema_rate(steps: int) -> str:
    """EMA rate with a time constant of ~steps/5 optimizer steps (the preset's 0.999 would still weigh the
    random initialisation by 0.999**steps, 30% after 1200 steps); clipped to [0.9, 0.9999]."""
    rate = min(0.9999, max(0.9, 1.0 - 5.0 / max(int(steps), 1)))
    return f"{rate:.4f}"


def machine_info(threads: int) -> dict:
    """CPU, core count, torch / Python versions and the load average at the start."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "load_avg_at_start": load_average()}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few minutes: smaller budget, steps up to 250")
    mode.add_argument("--smoke", action="store_true", help="seconds: tiny budget, T=50 (tests only)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (table.md, results.json, plots)")
    p.add_argument("--run_root", default="", help="keep run directories here (default: a temporary folder)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per model")
    p.add_argument("--num_samples", type=int, default=None, help="samples per (sampler, steps) FID point")
    p.add_argument("--nll_examples", type=int, default=None, help="test digits for the NLL (max 360)")
    p.add_argument("--sample_steps", default=None, help="comma-separated sampling step counts")
    p.add_argument("--noise_batches", type=int, default=None, help="mini-batches per gradient-noise probe")
    p.add_argument("--fid_bootstrap", type=int, default=50, help="bootstrap resamples for the FID standard error")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--diffusion_steps", type=int, default=None)
    p.add_argument("--num_channels", type=int, default=32)
    p.add_argument("--num_res_blocks", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema_rate", default="auto", help="EMA rate of the evaluated weights (auto: 1 - 5/steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fixed for reproducibility)")
    args = p.parse_args(argv)
    defaults = MODES["smoke" if args.smoke else "quick" if args.quick else "default"]
    for k, val in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, val)
    if args.ema_rate == "auto":
        args.ema_rate = auto_ema_rate(args.steps)
    args.sample_step_list = [int(x) for x in str(args.sample_steps).split(",") if x.strip()]
    bad = [k for k in args.sample_step_list if not 1 <= k <= args.diffusion_steps]
    if bad:
        p.error(f"--sample_steps {bad[0]}: must be in 1..--diffusion_steps {args.diffusion_steps}")
    if not 2 <= args.nll_examples <= 360:
        p.error(f"--nll_examples {args.nll_examples}: the digits test split has 360 images; use 2..360")
    if args.num_samples < 2:
        p.error(f"--num_samples {args.num_samples}: FID needs at least 2 samples")
    if args.steps < 1 or args.noise_batches < 2:
        p.error("--steps must be >= 1 and --noise_batches >= 2")
    return args


# ------------------------------------------------------------------------------------------------
# the stages
# ------------------------------------------------------------------------------------------------
def train_stage(results: dict, args, run_root: Path) -> None:
    """Stage 1-2: train every variant."""
    for variant in VARIANTS:
        results["variants"][variant.name] = train_variant(variant, args, run_root, log)


def nll_stage(results: dict, args) -> None:
    """Stage 1-2: test-split NLL of every trained model; L_simple also with sigma^2 = beta-tilde."""
    for name, rec in results["variants"].items():
        if rec["error"]:
            continue
        results["nll"][name] = nll_of(rec["run_dir"], args)
        log(f"[nll] {name}: {results['nll'][name]['bpd']:.3f} bits/dim")
        if name == "simple_cosine":
            results["nll"]["simple_cosine_small"] = nll_of(rec["run_dir"], args, {"sigma_small": True})
            log(f"[nll] simple_cosine (sigma^2=beta~): {results['nll']['simple_cosine_small']['bpd']:.3f}")


def sampling_stage(results: dict, args):
    """Stage 3: FID vs sampling steps.  Returns ``(sample grids, {(sampler, steps): features}, reference)``."""
    ref = fid_reference(args.num_samples)
    results["fid_reference"] = ref.info
    grids, features = {}, {}
    for sampler in SAMPLERS:
        rec = results["variants"].get(sampler.model)
        if rec is None or rec["error"]:
            continue
        for k in args.sample_step_list:
            r = sample_and_fid(rec["run_dir"], sampler, k, args, ref)
            images = r.pop("images")
            features[(sampler.key, k)] = r.pop("features")
            if k in (min(args.sample_step_list), max(args.sample_step_list)):
                grids[f"{sampler.key} {k}"] = images
            results["sampling"].append(dict(sampler=sampler.key, model=sampler.model, **r))
            log(f"[sample] {sampler.key} {k} steps: FID {r['fid']:.3f} +- {r['fid_bootstrap_se']:.3f}, "
                f"{r['sec_per_1000_samples']:.1f} s/1000")
    return grids, features, ref


def new_results(args, argv_list: list[str]) -> dict:
    """The results record before any stage ran: command, machine, settings and seeds."""
    return {
        "benchmark": "iddpm paper-in-miniature ablations",
        "paper": PAPER,
        "command": " ".join(["python", "benchmarks/ablations.py", *argv_list]),
        "argv": argv_list,
        "machine": machine_info(args.threads),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "seeds": {"train": args.seed, "nll_noise": args.seed, "sampling": args.seed,
                  "noise_probe_data": args.seed + 1000},
        "variants": {}, "nll": {}, "sampling": [], "wall_seconds": {},
    }


@contextlib.contextmanager
def run_root_dir(path: str) -> Iterator[Path]:
    """``--run_root``, or a temporary folder removed afterwards."""
    if path:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="iddpm-ablations-") as tmp:
        yield Path(tmp)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results = new_results(args, sys.argv[1:] if argv is None else list(argv))
    wall = results["wall_seconds"]
    log(f"ablations: {results['settings']}")
    with run_root_dir(args.run_root) as run_root:
        t0 = time.perf_counter()
        train_stage(results, args, run_root)
        wall["train"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        nll_stage(results, args)
        wall["nll"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        grids, features, ref = sampling_stage(results, args)
        wall["sampling"] = time.perf_counter() - t0
        wall["total"] = time.perf_counter() - t_start
        results["checks"] = paper_checks(results, features, ref.stats, args.fid_bootstrap, args.seed)
        order = sorted(grids, key=lambda s: (s.split()[0], int(s.split()[1])))
        write_outputs(results, out, {k: grids[k] for k in order})
    log(f"done in {wall['total'] / 60:.1f} min; wrote {out}/table.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
