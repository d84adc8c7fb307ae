"""The paper's ablations in miniature: Improved DDPM's findings re-measured on the bundled 8x8 digits, on a CPU.

Usage::

    python benchmarks/ablations.py                 # default budget (~35-45 min on a shared 2-core CPU)
    python benchmarks/ablations.py --quick         # a few minutes, same stages, smaller budget
    python benchmarks/ablations.py --smoke --out /tmp/abl   # seconds; for the e2e test only

Stages (every model is trained with the product: :func:`iddpm.train.app.build_trainer` + ``Trainer.run``):

1. **Schedule** -- L_hybrid with the linear vs the cosine noise schedule; test-split NLL (bits/dim, the full
   ``T``-step ``calc_bpd_loop`` via :func:`iddpm.eval.nll.compute_nll`, EMA weights).
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
   the models were trained on) and measured seconds per 1000 samples.

Determinism: the budget is counted in optimizer steps / examples / samples, never in minutes; every random
draw is seeded from ``--seed`` and torch runs with ``--threads`` intra-op threads (default 1), so the same
command on the same machine gives the same numbers (timings excepted).

Outputs in ``--out`` (default ``benchmarks/results/ablations``): ``table.md``, ``results.json`` (machine,
command, budget, seeds, wall time per stage, every number), ``training_curves.csv`` (per-step loss and
gradient norm of every run) and the plots ``nll.png``, ``fid_vs_steps.png``, ``training_noise.png``,
``samples.png``.  Run directories (checkpoints) go to a temporary folder unless ``--run_root`` is given.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ablations"
PAPER = "Nichol & Dhariwal 2021, Improved Denoising Diffusion Probabilistic Models (arXiv:2102.09672)"


class Variant(NamedTuple):
    """One trained model of the ablation.  ``overrides`` are flat iddpm.config flags on top of the preset."""

    name: str
    label: str
    objective: str
    overrides: dict


VARIANTS = (
    Variant("hybrid_linear", "L_hybrid, linear", "L_hybrid",
            dict(noise_schedule="linear", learn_sigma=True, rescale_learned_sigmas=True, use_kl=False)),
    Variant("hybrid_cosine", "L_hybrid, cosine", "L_hybrid",
            dict(noise_schedule="cosine", learn_sigma=True, rescale_learned_sigmas=True, use_kl=False)),
    Variant("simple_cosine", "L_simple, cosine", "L_simple",
            dict(noise_schedule="cosine", learn_sigma=False, sigma_small=False, use_kl=False)),
    Variant("vlb_uniform", "L_vlb, cosine, uniform t", "L_vlb",
            dict(noise_schedule="cosine", learn_sigma=True, rescale_learned_sigmas=True, use_kl=True,
                 schedule_sampler="uniform")),
    Variant("vlb_importance", "L_vlb, cosine, importance-sampled t", "L_vlb",
            dict(noise_schedule="cosine", learn_sigma=True, rescale_learned_sigmas=True, use_kl=True,
                 schedule_sampler="loss-second-moment")),
)

# (key, label, variant trained, diffusion overrides at sampling time, use_ddim)
SAMPLERS = (
    ("hybrid_ancestral", "L_hybrid (learned sigma), ancestral", "hybrid_cosine", {}, False),
    ("simple_large_ancestral", "L_simple sigma^2=beta, ancestral", "simple_cosine", {}, False),
    ("simple_small_ancestral", "L_simple sigma^2=beta~, ancestral", "simple_cosine", {"sigma_small": True}, False),
    ("simple_ddim", "DDIM eta=0 (L_simple model)", "simple_cosine", {}, True),
)

MODES = {
    # steps per model, samples per (sampler, steps), NLL test examples, sampling step counts, noise batches
    "default": dict(steps=1000, num_samples=200, nll_examples=128, sample_steps="25,50,100,250,1000",
                    noise_batches=16, batch_size=64, diffusion_steps=1000),
    "quick": dict(steps=200, num_samples=64, nll_examples=32, sample_steps="25,50,100,250",
                  noise_batches=8, batch_size=64, diffusion_steps=1000),
    "smoke": dict(steps=4, num_samples=16, nll_examples=4, sample_steps="5,10", noise_batches=2,
                  batch_size=8, diffusion_steps=50),
}


# ------------------------------------------------------------------------------------------------
# small pure helpers
# ------------------------------------------------------------------------------------------------
def auto_ema_rate(steps: int) -> str:
    """EMA rate with a time constant of ~steps/5 optimizer steps (the preset's 0.999 would still weigh the
    random initialisation by 0.999**steps, 30% after 1200 steps); clipped to [0.9, 0.9999]."""
    rate = min(0.9999, max(0.9, 1.0 - 5.0 / max(int(steps), 1)))
    return f"{rate:.4f}"


def spread(values) -> dict:
    """Mean, std and coefficient of variation (std / |mean|) of a 1-d sequence (NaN when empty)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size < 2:
        return {"mean": float("nan"), "std": float("nan"), "cv": float("nan"), "n": int(v.size)}
    mean, std = float(v.mean()), float(v.std(ddof=1))
    return {"mean": mean, "std": std, "cv": std / abs(mean) if mean else float("nan"), "n": int(v.size)}


def noise_scale_from_grads(grads: torch.Tensor, batch_size: int) -> dict:
    """Gradient noise scale from ``K`` mini-batch gradients ``grads`` float64 [K, P] of batch ``batch_size``.

    tr(Sigma_batch) = sum_i |G_i - G_mean|^2 / (K - 1); per-example tr(Sigma) = B tr(Sigma_batch);
    |G|^2 unbiased = |G_mean|^2 - tr(Sigma_batch) / K.  ``b_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018);
    NaN when the |G|^2 estimate is not positive (gradient signal below the noise floor of K batches).
    """
    k = grads.shape[0]
    mean = grads.mean(0)
    tr_batch = float(((grads - mean) ** 2).sum(1).sum() / (k - 1))
    g2 = float(mean.pow(2).sum()) - tr_batch / k
    b_simple = batch_size * tr_batch / g2 if g2 > 0 else float("nan")
    g2_biased = float(mean.pow(2).sum())
    return {"b_simple": b_simple, "b_simple_lower": batch_size * tr_batch / g2_biased if g2_biased > 0 else 0.0,
            "tr_sigma": batch_size * tr_batch, "g2": g2, "mean_batch_grad_norm": float(grads.norm(dim=1).mean())}


def median_noise_scale(probes, from_step: int = 0) -> tuple[float, str]:
    """Median B_simple over probes at ``step >= from_step``; a probe whose |G|^2 estimate is not positive (noise
    beyond what its batches resolve) counts as +inf.  Returns ``(value, text)``; text is ``"> L"`` (L = median of
    the lower bounds ``B tr(Sigma_batch) / |G_mean|^2``) when the median is infinite, ``"n/a"`` with no probes."""
    ps = [p for p in probes if p["step"] >= from_step]
    if not ps:
        return float("nan"), "n/a"
    vals = [p["b_simple"] if math.isfinite(p["b_simple"]) else math.inf for p in ps]
    med = float(np.median(vals))
    if math.isfinite(med):
        return med, f"{med:.0f}"
    return med, f"> {float(np.median([p['b_simple_lower'] for p in ps])):.0f}"


def paired_diff(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean and standard error of a - b over the same examples (same noise streams)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
    return {"diff": float(d.mean()), "stderr": se}


def verdict(diff: float, stderr: float, expect_negative: bool) -> str:
    """'agrees' / 'disagrees' when the paired difference is beyond 2 standard errors, else 'within noise'."""
    if not (math.isfinite(diff) and math.isfinite(stderr)):
        return "n/a"
    if abs(diff) <= 2 * stderr:
        return "within noise"
    return "agrees" if (diff < 0) == expect_negative else "disagrees"


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "load_avg_at_start": load}


# ------------------------------------------------------------------------------------------------
# stage 1-2: training with per-step metrics and the gradient noise scale
# ------------------------------------------------------------------------------------------------
class StepRecorder:
    """A metric sink (``write(step, metrics)``) that keeps every step's loss and grad norm, notes when the
    importance sampler left its warm-up, and measures the gradient noise scale at ``probe_steps``."""

    def __init__(self, trainer, probe_steps, probe_fn) -> None:
        self.trainer = trainer
        self.probe_steps = set(probe_steps)
        self.probe_fn = probe_fn
        self.steps: list[int] = []
        self.loss: list[float] = []
        self.grad_norm: list[float] = []
        self.noise: list[dict] = []
        self.sampler_active_from: int | None = None
        self.probe_seconds = 0.0

    def write(self, step: int, metrics: dict) -> None:
        self.steps.append(int(step))
        self.loss.append(float(metrics.get("loss", float("nan"))))
        self.grad_norm.append(float(metrics.get("grad_norm", float("nan"))))
        sampler = self.trainer.sampler
        if self.sampler_active_from is None and hasattr(sampler, "update_with_local_losses"):
            w = sampler.weights()
            if not np.allclose(w, w[0]):
                self.sampler_active_from = int(step)
        if step in self.probe_steps:
            t0 = time.perf_counter()
            self.noise.append(dict(step=int(step), **self.probe_fn(self.trainer)))
            self.probe_seconds += time.perf_counter() - t0

    def close(self) -> None:
        pass


def make_noise_probe(cfg, num_batches: int, seed: int):
    """``probe(trainer) -> noise-scale dict``: ``num_batches`` gradients of the training objective (the trainer's
    own timestep sampler and importance weights) on fresh mini-batches drawn from a fixed seed, so every
    variant and every probe sees the same images."""
    from iddpm.data import load_dataset, make_loader

    ds = load_dataset(cfg.data, cfg.model.image_size, cfg.model.in_channels, split="train", seed=seed)
    batch = cfg.train.batch_size

    def probe(trainer) -> dict:
        loader = make_loader(ds, batch, shuffle=True, seed=seed + 1, drop_last=True, infinite=True)
        gen = torch.Generator().manual_seed(seed + 2)
        module, diffusion = trainer.train_module, trainer.diffusion
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        device = trainer.device
        grads = []
        for _, (x, _cond) in zip(range(num_batches), loader):
            x = x.to(device).float()
            t, w = trainer.sampler.sample(x.shape[0], "cpu", generator=gen)
            noise = torch.randn(x.shape, generator=gen).to(device)
            losses = diffusion.training_losses(module, x, t.to(device), noise=noise)
            loss = (losses["loss"] * w.to(device)).mean()
            g = torch.autograd.grad(loss, params, allow_unused=True)
            grads.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1).double().cpu()
                                    for gi, p in zip(g, params)]))
        return noise_scale_from_grads(torch.stack(grads), batch)

    return probe


def build_config(variant: Variant, args, run_dir: Path):
    from iddpm.config import apply_overrides, preset

    flat = dict(variant.overrides)
    flat.update(num_channels=args.num_channels, num_res_blocks=args.num_res_blocks,
                diffusion_steps=args.diffusion_steps, lr=args.lr, batch_size=args.batch_size,
                ema_rate=args.ema_rate, max_steps=args.steps, seed=args.seed, log_interval=1, save_interval=0,
                keep_last=1, sample_every=0, run_dir=str(run_dir), device="cpu")
    return apply_overrides(preset("digits"), flat, source=f"ablation {variant.name}").validate()


def train_variant(variant: Variant, args, run_root: Path, log) -> dict:
    """Train one variant into ``run_root/<name>``; returns its training record (curves + noise scale)."""
    from iddpm.runtime.sinks import CSVSink, MultiSink
    from iddpm.train.app import build_trainer
    from iddpm.train.trainer import NonFiniteLossError

    run_dir = run_root / variant.name
    cfg = build_config(variant, args, run_dir)
    prepared = build_trainer(cfg, run_dir=run_dir, progress=False)
    trainer = prepared.trainer
    trainer.sinks.close()  # replace console/TensorBoard sinks: one CSV row per step + our recorder
    probes = sorted({max(1, round(args.steps * f)) for f in (0.25, 0.5, 0.75, 1.0)})
    rec = StepRecorder(trainer, probes, make_noise_probe(cfg, args.noise_batches, args.seed + 1000))
    trainer.sinks = MultiSink([CSVSink(run_dir / "metrics.csv"), rec])
    t0 = time.perf_counter()
    error = None
    try:
        result = trainer.run()
        steps_done = result.step
    except NonFiniteLossError as exc:  # L_vlb can blow up; record it instead of losing the whole benchmark
        error, steps_done = str(exc), trainer.step
    finally:
        prepared.dist.shutdown()
    wall = time.perf_counter() - t0
    half = len(rec.loss) // 2
    out = {
        "name": variant.name, "label": variant.label, "objective": variant.objective,
        "overrides": variant.overrides, "run_dir": str(run_dir), "steps": steps_done, "error": error,
        "wall_s": wall, "noise_probe_s": rec.probe_seconds,
        "loss_second_half": spread(rec.loss[half:]), "grad_norm_second_half": spread(rec.grad_norm[half:]),
        "noise_scale": rec.noise, "importance_sampler_active_from_step": rec.sampler_active_from,
        "curves": {"step": rec.steps, "loss": rec.loss, "grad_norm": rec.grad_norm},
    }
    log(f"[train] {variant.name}: {steps_done} steps in {wall:.0f}s"
        f" (loss cv {out['loss_second_half']['cv']:.3f}, grad-norm cv {out['grad_norm_second_half']['cv']:.3f})"
        + (f" ERROR {error}" if error else ""))
    return out


# ------------------------------------------------------------------------------------------------
# stage 1-2: NLL
# ------------------------------------------------------------------------------------------------
def nll_of(run_dir: str, args, overrides: dict | None = None) -> dict:
    """Test-split bits/dim of a run's EMA weights (first ``--nll_examples`` test digits, noise seeded)."""
    from iddpm.api import load_run, nll_loader
    from iddpm.eval.nll import compute_nll
    from iddpm.models import optimize

    model, diffusion, cfg = load_run(run_dir, overrides=overrides)
    data = nll_loader(cfg, split="test", batch_size=min(128, args.nll_examples))
    t0 = time.perf_counter()
    res = compute_nll(optimize(model, "sample"), diffusion, data, progress=False, seed=args.seed,
                      max_examples=args.nll_examples, use_labels=False)
    out = dict(res.summary(), wall_s=time.perf_counter() - t0)
    out["per_example_bpd"] = res.per_example_bpd.tolist()
    return out


# ------------------------------------------------------------------------------------------------
# stage 3: FID vs sampling steps
# ------------------------------------------------------------------------------------------------
def _fid_of_features(features: np.ndarray, ref_stats) -> float:
    from iddpm.eval.metrics import feature_stats, frechet_distance

    st = feature_stats(features)
    try:
        return frechet_distance(st.mu, st.sigma, ref_stats.mu, ref_stats.sigma)
    except ValueError:  # ill-conditioned covariance (very few samples)
        return float("nan")


def paired_fid_diff(feat_a: np.ndarray, feat_b: np.ndarray, ref_stats, num_boot: int, seed: int) -> dict:
    """FID(a) - FID(b) and its paired-bootstrap standard error: sample i of both sets comes from the same seeded
    starting noise, so both are resampled with the same indices (``num_boot`` times, seeded)."""
    d = _fid_of_features(feat_a, ref_stats) - _fid_of_features(feat_b, ref_stats)
    rng = np.random.default_rng([int(seed), 0xD1FF])
    n = min(len(feat_a), len(feat_b))
    boots = []
    for _ in range(num_boot):
        idx = rng.integers(0, n, size=n)
        boots.append(_fid_of_features(feat_a[idx], ref_stats) - _fid_of_features(feat_b[idx], ref_stats))
    boots = [b for b in boots if math.isfinite(b)]
    return {"diff": float(d), "stderr": float(np.std(boots, ddof=1)) if len(boots) > 1 else float("nan")}


def fid_with_bootstrap(images: np.ndarray, extractor, ref_stats, num_boot: int, seed: int):
    """``(fid, stderr, features)``: FID of uint8 NHWC ``images`` vs ``ref_stats``, its bootstrap standard error
    (samples resampled with replacement ``num_boot`` times from a seeded generator; the reference is held fixed;
    NaN when the covariance is too ill-conditioned) and the float64 [N, D] features."""
    from iddpm.eval.evaluate import compute_stats
    from iddpm.eval.metrics import feature_stats, frechet_distance

    stats = compute_stats(images, extractor)
    try:
        fid = frechet_distance(stats.mu, stats.sigma, ref_stats.mu, ref_stats.sigma)
    except ValueError:
        return float("nan"), float("nan"), stats.features
    rng = np.random.default_rng([int(seed), 0xF1D])
    boots = []
    for _ in range(num_boot):
        idx = rng.integers(0, len(stats.features), size=len(stats.features))
        b = feature_stats(stats.features[idx])
        try:
            boots.append(frechet_distance(b.mu, b.sigma, ref_stats.mu, ref_stats.sigma))
        except ValueError:
            continue
    se = float(np.std(boots, ddof=1)) if len(boots) > 1 else float("nan")
    return float(fid), se, stats.features


def sample_and_fid(run_dir: str, overrides: dict, use_ddim: bool, steps: int, args, extractor, ref_stats) -> dict:
    from iddpm.api import build_diffusion, load_run
    from iddpm.models import optimize
    from iddpm.sample import generate

    model, _, cfg = load_run(run_dir, overrides=overrides or None)
    respacing = f"ddim{steps}" if use_ddim else str(steps)
    diffusion = build_diffusion(cfg.diffusion, timestep_respacing=respacing)
    m = cfg.model
    fast = optimize(model, "sample")
    t0 = time.perf_counter()
    res = generate(fast, diffusion, num_samples=args.num_samples, batch_size=min(args.num_samples, 256),
                   image_shape=(m.in_channels, m.image_size, m.image_size), seed=args.seed, use_ddim=use_ddim,
                   progress=False)
    wall = time.perf_counter() - t0
    fid, fid_se, feats = fid_with_bootstrap(res.images, extractor, ref_stats, args.fid_bootstrap, args.seed)
    return {"steps": steps, "respacing": respacing, "fid": fid, "fid_bootstrap_se": fid_se, "wall_s": wall,
            "sec_per_1000_samples": wall / args.num_samples * 1000.0, "images": res.images, "features": feats}


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------
def _fmt(x, nd=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{nd}f}"


def paper_checks(results: dict, features: dict | None = None, ref_stats=None, num_boot: int = 50,
                 seed: int = 0) -> list[dict]:
    """Compare the miniature's numbers with the paper's qualitative findings; one dict per claim.

    ``features``: ``{(sampler, steps): float64 [N, D]}`` sample features; with ``ref_stats`` the FID claims use a
    paired bootstrap of FID(a) - FID(b); without them, the two FIDs' own standard errors combined."""
    v = results["variants"]
    nll = results["nll"]
    checks = []

    def nll_claim(claim, a, b):
        if a in nll and b in nll:
            d = paired_diff(nll[a]["per_example_bpd"], nll[b]["per_example_bpd"])
            checks.append({"claim": claim, "measured": f"{_fmt(nll[a]['bpd'])} vs {_fmt(nll[b]['bpd'])} bits/dim "
                           f"(paired diff {d['diff']:+.3f} +- {d['stderr']:.3f})",
                           "verdict": verdict(d["diff"], d["stderr"], expect_negative=True)})

    nll_claim("cosine schedule gives a better NLL than linear (L_hybrid)", "hybrid_cosine", "hybrid_linear")
    fixed = [n for n in ("simple_cosine", "simple_cosine_small") if n in nll]
    if fixed:  # the better of the two fixed variances (sigma^2 = beta, sigma^2 = beta-tilde)
        best = min(fixed, key=lambda n: nll[n]["bpd"])
        which = "beta~" if best.endswith("_small") else "beta"
        nll_claim(f"L_hybrid (learned sigma) gives a better NLL than L_simple (fixed sigma^2={which}, the better "
                  "fixed choice here)", "hybrid_cosine", best)
    nll_claim("L_vlb with importance sampling gives the best NLL (better than L_hybrid)",
              "vlb_importance", "hybrid_cosine")
    nll_claim("importance sampling improves L_vlb's NLL over uniform t", "vlb_importance", "vlb_uniform")

    def noise(name, from_step=0):
        return median_noise_scale(v.get(name, {}).get("noise_scale", []), from_step)

    active = v.get("vlb_importance", {}).get("importance_sampler_active_from_step")
    for a, b, claim in (("vlb_uniform", "hybrid_cosine", "L_vlb (uniform t) has noisier gradients than L_hybrid"),
                        ("vlb_uniform", "vlb_importance", "importance sampling reduces the gradient noise of L_vlb")):
        if a in v and b in v:
            if b == "vlb_importance" and active is None:
                checks.append({"claim": claim, "measured": "the loss-second-moment sampler never left its warm-up "
                               "(needs 10 losses of every t): identical to uniform; train longer", "verdict": "n/a"})
                continue
            start = active if b == "vlb_importance" else 0  # noise-scale probes once the sampler is active
            (na, ta), (nb, tb) = noise(a, start), noise(b, start)
            la, lb = v[a]["loss_second_half"]["cv"], v[b]["loss_second_half"]["cv"]
            ga, gb = v[a]["grad_norm_second_half"]["cv"], v[b]["grad_norm_second_half"]["cv"]
            votes = [x > y for x, y in ((na, nb), (la, lb), (ga, gb))
                     if not (math.isnan(x) or math.isnan(y)) and not (math.isinf(x) and math.isinf(y))]
            verdict_txt = "n/a" if not votes else ("agrees" if all(votes) else
                                                   "disagrees" if not any(votes) else "mixed")
            probes = f" (median of probes from step {start}, once the sampler is active)" if start else ""
            checks.append({"claim": claim, "measured": f"noise scale {ta} vs {tb}{probes}; loss cv "
                           f"{_fmt(la)} vs {_fmt(lb)}; grad-norm cv {_fmt(ga)} vs {_fmt(gb)}",
                           "verdict": verdict_txt})

    fid_rows = {(r["sampler"], r["steps"]): r for r in results["sampling"]}
    steps = sorted({r["steps"] for r in results["sampling"]})
    few = [s for s in steps if s <= 100]

    def fid_claim(claim, better, worse, at):
        rows = []
        for k in at:
            a, b = fid_rows.get((better, k)), fid_rows.get((worse, k))
            if a is None or b is None or not (math.isfinite(a["fid"]) and math.isfinite(b["fid"])):
                continue
            if features and (better, k) in features and (worse, k) in features and ref_stats is not None:
                pd = paired_fid_diff(features[(better, k)], features[(worse, k)], ref_stats, num_boot, seed + k)
                se = pd["stderr"]
            else:
                se = math.hypot(a.get("fid_bootstrap_se", float("nan")), b.get("fid_bootstrap_se", float("nan")))
            rows.append((k, a["fid"], b["fid"], a["fid"] - b["fid"], se))
        if not rows:
            return
        wins = [k for k, _, _, d, se in rows if d < -2 * se]
        losses = [k for k, _, _, d, se in rows if d > 2 * se]
        ties = [k for k, *_ in rows if k not in wins and k not in losses]
        if not wins and not losses:
            verdict_txt = "within noise"
        elif not losses:
            verdict_txt = "agrees" + (f" (within noise at {', '.join(map(str, ties))} steps)" if ties else "")
        elif not wins:
            verdict_txt = "disagrees" + (f" (within noise at {', '.join(map(str, ties))} steps)" if ties else "")
        else:
            verdict_txt = f"mixed (agrees at {', '.join(map(str, wins))}; disagrees at {', '.join(map(str, losses))})"
        txt = "; ".join(f"{k}: {a:.2f} vs {b:.2f} (diff {d:+.2f} +- {se:.2f})" for k, a, b, d, se in rows)
        checks.append({"claim": claim, "measured": f"FID by steps {txt}", "verdict": verdict_txt})

    fid_claim("with few steps (<= 100) learned sigmas (L_hybrid) sample better than fixed sigma^2=beta",
              "hybrid_ancestral", "simple_large_ancestral", few)
    fid_claim("with few steps (<= 100) learned sigmas (L_hybrid) sample better than fixed sigma^2=beta~",
              "hybrid_ancestral", "simple_small_ancestral", few)
    fid_claim("DDIM beats L_hybrid ancestral below 50 steps", "simple_ddim", "hybrid_ancestral",
              [s for s in steps if s < 50])
    fid_claim("L_hybrid ancestral beats DDIM at 50 steps and more", "hybrid_ancestral", "simple_ddim",
              [s for s in steps if s >= 50])
    return checks


def render_table(results: dict) -> str:
    s = results["settings"]
    mach = results["machine"]
    v = results["variants"]
    nll = results["nll"]
    lines = [
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
        "## 1-2. Schedule and objective: test NLL and gradient noise",
        "",
        "| model | test NLL (bits/dim) | loss std/mean (2nd half) | grad-norm std/mean (2nd half) "
        "| gradient noise scale B_simple (median of probes) | train wall (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, rec in v.items():
        n = nll.get(name, {})
        err = f" (stopped: {rec['error'].split(';')[0]})" if rec.get("error") else ""
        if name == "vlb_importance":
            act = rec.get("importance_sampler_active_from_step")
            err += " (sampler never left warm-up = uniform)" if act is None else f" (sampler active from step {act})"
        lines.append(
            f"| {rec['label']}{err} | {_fmt(n.get('bpd'))} +- {_fmt(n.get('bpd_stderr'))} "
            f"| {_fmt(rec['loss_second_half']['cv'])} | {_fmt(rec['grad_norm_second_half']['cv'])} "
            f"| {median_noise_scale(rec['noise_scale'])[1]} | {rec['wall_s']:.0f} |")
        if name == "simple_cosine" and "simple_cosine_small" in nll:
            small = nll["simple_cosine_small"]
            lines.append(f"| L_simple, cosine, evaluated with sigma^2=beta~ | {_fmt(small['bpd'])} +- "
                         f"{_fmt(small['bpd_stderr'])} | | | | |")
    lines += ["", "L_simple is trained with fixed sigma^2 = beta (the original's default, FIXED_LARGE); its NLL is "
              "given with that variance and with sigma^2 = beta~ (FIXED_SMALL). NLL = the full T-step variational "
              "bound (EMA weights); +- is the standard error over test examples; the claims below use paired "
              "differences (same examples, same noise). std/mean of the per-step loss and gradient norm is taken "
              "over the second half of training; B_simple = tr(Sigma)/|G|^2 from independent mini-batches at 25/50/"
              "75/100% of training (the paper's Figure 5 quantity).", ""]

    steps = sorted({r["steps"] for r in results["sampling"]})
    lines += ["## 3. Sampling steps: digit-FID (lower is better) and seconds per 1000 samples", "",
              f"FID: digits CNN features of {s['num_samples']} samples vs the digits train split "
              f"({results['fid_reference']['num']} images). "
              f"Data floor: {results['fid_reference']['floor_num_test_images']} "
              f"held-out test digits vs the train split = {_fmt(results['fid_reference']['floor_fid'], 2)}. "
              f"+- = bootstrap standard error over the samples ({s['fid_bootstrap']} resamples; reference fixed). "
              "Sample i of every sampler starts from the same seeded noise, so the claims below use a paired "
              "bootstrap of the FID difference and call it real only beyond 2 standard errors.", "",
              "| sampler | " + " | ".join(f"{k} steps" for k in steps) + " |",
              "|---|" + "---|" * len(steps)]
    by = {}
    for r in results["sampling"]:
        by.setdefault(r["sampler"], {})[r["steps"]] = r
    labels = {k: lab for k, lab, *_ in SAMPLERS}
    for key, rows in by.items():
        lines.append(f"| {labels.get(key, key)} | " + " | ".join(
            f"{_fmt(rows[k]['fid'], 2)} +- {_fmt(rows[k].get('fid_bootstrap_se'), 2)}" if k in rows else ""
            for k in steps) + " |")
    lines += ["", "| sampler (s / 1000 samples) | " + " | ".join(f"{k} steps" for k in steps) + " |",
              "|---|" + "---|" * len(steps)]
    for key, rows in by.items():
        lines.append(f"| {labels.get(key, key)} | " + " | ".join(
            f"{rows[k]['sec_per_1000_samples']:.1f}" if k in rows else "" for k in steps) + " |")
    lines += ["", "## Where the miniature agrees and disagrees with the paper", "",
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


def write_plots(results: dict, out: Path, sample_grids: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    v, nll = results["variants"], results["nll"]
    # NLL by schedule / objective
    names = [n for n in ("hybrid_linear", "hybrid_cosine", "simple_cosine", "simple_cosine_small", "vlb_uniform",
                         "vlb_importance") if n in nll]
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
    fig.tight_layout()
    fig.savefig(out / "nll.png", dpi=110)
    plt.close(fig)
    written.append("nll.png")

    # FID vs steps
    fig, ax = plt.subplots(figsize=(6, 4))
    lab = {k: label for k, label, *_ in SAMPLERS}
    for key in dict.fromkeys(r["sampler"] for r in results["sampling"]):
        rows = sorted((r for r in results["sampling"] if r["sampler"] == key), key=lambda r: r["steps"])
        ax.errorbar([r["steps"] for r in rows], [r["fid"] for r in rows],
                    yerr=[r.get("fid_bootstrap_se", 0.0) for r in rows], marker="o", capsize=3,
                    label=lab.get(key, key))
    floor = results["fid_reference"]["floor_fid"]
    if math.isfinite(floor):
        ax.axhline(floor, color="gray", ls="--", lw=1, label="held-out digits (floor)")
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("digit-FID vs train split")
    ax.legend(fontsize=7)
    ax.set_title("FID vs sampling steps")
    fig.tight_layout()
    fig.savefig(out / "fid_vs_steps.png", dpi=110)
    plt.close(fig)
    written.append("fid_vs_steps.png")

    # training noise: loss curves (L_vlb uniform vs importance vs L_hybrid) and grad norms
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
    fig.tight_layout()
    fig.savefig(out / "training_noise.png", dpi=110)
    plt.close(fig)
    written.append("training_noise.png")

    if sample_grids:
        from iddpm.sample import make_grid

        keys = list(sample_grids)
        fig, axes = plt.subplots(1, len(keys), figsize=(2.4 * len(keys), 2.8), squeeze=False)
        for ax, key in zip(axes[0], keys):
            grid = make_grid(sample_grids[key][:36], nrow=6, pad=1, pad_value=0)
            ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
            ax.set_title(key, fontsize=7)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / "samples.png", dpi=110)
        plt.close(fig)
        written.append("samples.png")
    return written


def write_outputs(results: dict, out: Path, sample_grids: dict) -> None:
    from iddpm.runtime.atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "step", "loss", "grad_norm"])
    for name, rec in results["variants"].items():
        c = rec["curves"]
        for s, lo, g in zip(c["step"], c["loss"], c["grad_norm"]):
            w.writerow([name, s, repr(lo), repr(g)])
    atomic_write_text(out / "training_curves.csv", buf.getvalue())
    results["plots"] = write_plots(results, out, sample_grids)
    slim = json.loads(json.dumps(results, default=float))
    for rec in slim["variants"].values():
        rec.pop("curves", None)  # in training_curves.csv
    for rec in slim["nll"].values():
        rec.pop("per_example_bpd", None)
    atomic_write_text(out / "results.json", json.dumps(slim, indent=2, allow_nan=True) + "\n")
    atomic_write_text(out / "table.md", render_table(results))


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
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


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    argv_list = sys.argv[1:] if argv is None else list(argv)
    results: dict = {
        "benchmark": "iddpm paper-in-miniature ablations",
        "paper": PAPER,
        "command": " ".join(["python", "benchmarks/ablations.py", *argv_list]),
        "argv": argv_list,
        "machine": machine_info(args.threads),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "settings": {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "ema_rate", "num_channels",
                                                   "num_res_blocks", "diffusion_steps", "nll_examples",
                                                   "num_samples", "sample_step_list", "noise_batches", "fid_bootstrap",
                                                   "seed")},
        "seeds": {"train": args.seed, "nll_noise": args.seed, "sampling": args.seed,
                  "noise_probe_data": args.seed + 1000},
        "variants": {}, "nll": {}, "sampling": [], "wall_seconds": {},
    }
    log(f"ablations: {results['settings']}")

    tmp = None
    if args.run_root:
        run_root = Path(args.run_root)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="iddpm-ablations-")
        run_root = Path(tmp.name)
    try:
        # stage 1-2: train every variant
        t0 = time.perf_counter()
        for variant in VARIANTS:
            results["variants"][variant.name] = train_variant(variant, args, run_root, log)
        results["wall_seconds"]["train"] = time.perf_counter() - t0

        # stage 1-2: NLL on the test split
        t0 = time.perf_counter()
        for name, rec in results["variants"].items():
            if rec["error"]:
                continue
            results["nll"][name] = nll_of(rec["run_dir"], args)
            log(f"[nll] {name}: {results['nll'][name]['bpd']:.3f} bits/dim")
            if name == "simple_cosine":
                results["nll"]["simple_cosine_small"] = nll_of(rec["run_dir"], args, {"sigma_small": True})
                log(f"[nll] simple_cosine (sigma^2=beta~): {results['nll']['simple_cosine_small']['bpd']:.3f}")
        results["wall_seconds"]["nll"] = time.perf_counter() - t0

        # stage 3: FID vs sampling steps
        t0 = time.perf_counter()
        from iddpm.data.digits import load_digits_split
        from iddpm.eval.evaluate import compute_stats
        from iddpm.eval.features import DigitsExtractor
        from iddpm.eval.metrics import frechet_distance

        extractor = DigitsExtractor()
        ref_stats = compute_stats(load_digits_split("train")[0][..., None], extractor)
        floor_n = min(args.num_samples, 360)
        floor = compute_stats(load_digits_split("test")[0][:floor_n, ..., None], extractor)
        results["fid_reference"] = {"split": "digits-train", "num": int(ref_stats.num), "extractor": extractor.name,
                                    "floor_fid": frechet_distance(floor.mu, floor.sigma, ref_stats.mu,
                                                                  ref_stats.sigma),
                                    "floor_num_test_images": floor_n}
        grids, features = {}, {}
        for key, _label, variant_name, overrides, use_ddim in SAMPLERS:
            rec = results["variants"].get(variant_name)
            if rec is None or rec["error"]:
                continue
            for k in args.sample_step_list:
                r = sample_and_fid(rec["run_dir"], overrides, use_ddim, k, args, extractor, ref_stats)
                images = r.pop("images")
                features[(key, k)] = r.pop("features")
                if k in (min(args.sample_step_list), max(args.sample_step_list)):
                    grids[f"{key} {k}"] = images
                results["sampling"].append(dict(sampler=key, model=variant_name, **r))
                log(f"[sample] {key} {k} steps: FID {r['fid']:.3f} +- {r['fid_bootstrap_se']:.3f}, "
                    f"{r['sec_per_1000_samples']:.1f} s/1000")
        results["wall_seconds"]["sampling"] = time.perf_counter() - t0
        results["wall_seconds"]["total"] = time.perf_counter() - t_start
        results["checks"] = paper_checks(results, features, ref_stats, args.fid_bootstrap, args.seed)
        order = sorted(grids, key=lambda s: (s.split()[0], int(s.split()[1])))
        write_outputs(results, out, {k: grids[k] for k in order})
    finally:
        if tmp is not None:
            tmp.cleanup()
    log(f"done in {results['wall_seconds']['total'] / 60:.1f} min; wrote {out}/table.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
