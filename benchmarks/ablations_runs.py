"""What the ablation trains, evaluates and samples, and how: every step goes through iddpm's own entry points.

- configs: :func:`iddpm.api.train_config` (the digits preset + the variant's flags, as ``iddpm train`` resolves them);
- training: :func:`iddpm.train.app.build_trainer` + ``Trainer.run`` -- not :func:`iddpm.api.train`, because the
  per-step recorder and the gradient-noise probes must run *inside* the loop on the live trainer (raw weights,
  the importance sampler's loss history) and ``api.train`` has no sink or callback seam;
- NLL: :func:`iddpm.api.nll`; sampling: :func:`iddpm.api.sample`; FID: :func:`iddpm.api.evaluate`.

Only the benchmark's statistics (bootstrap errors, noise scale) live in :mod:`ablations_stats`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from ablations_stats import fid_bootstrap_se, noise_scale_from_grads, spread

from iddpm import api
from iddpm.config import ConfigError, RunConfig
from iddpm.data import load_dataset, make_loader
from iddpm.data.digits import load_digits_split
from iddpm.eval.evaluate import compute_stats
from iddpm.eval.features import make_extractor
from iddpm.eval.metrics import FeatureStats
from iddpm.runtime.sinks import CSVSink, MultiSink
from iddpm.train.app import build_trainer
from iddpm.train.trainer import NonFiniteLossError


class Variant(NamedTuple):
    """One trained model of the ablation.  ``overrides`` are flat iddpm.config flags on top of the preset."""

    name: str
    label: str
    objective: str
    overrides: dict


class Sampler(NamedTuple):
    """One sampling method: the ``model`` (a :class:`Variant` name) sampled with diffusion ``overrides``."""

    key: str
    label: str
    model: str
    overrides: dict
    use_ddim: bool


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

SAMPLERS = (
    Sampler("hybrid_ancestral", "L_hybrid (learned sigma), ancestral", "hybrid_cosine", {}, False),
    Sampler("simple_large_ancestral", "L_simple sigma^2=beta, ancestral", "simple_cosine", {}, False),
    Sampler("simple_small_ancestral", "L_simple sigma^2=beta~, ancestral", "simple_cosine", {"sigma_small": True},
            False),
    Sampler("simple_ddim", "DDIM eta=0 (L_simple model)", "simple_cosine", {}, True),
)


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


def make_noise_probe(cfg: RunConfig, num_batches: int, seed: int):
    """``probe(trainer) -> noise-scale dict``: ``num_batches`` gradients of the training objective (the trainer's
    own network, diffusion, timestep sampler and importance weights) on fresh mini-batches drawn from a fixed
    seed, so every variant and every probe sees the same images.  The probe's loader is its own (built once
    here): drawing from the trainer's would change the training stream."""
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


def variant_config(variant: Variant, args, run_dir: Path) -> RunConfig:
    """The variant's RunConfig: the digits preset, its flags and the benchmark's budget, as ``iddpm train``
    resolves them (one CSV row per step, no intermediate checkpoints or sample grids, CPU)."""
    flat = dict(variant.overrides)
    flat.update(num_channels=args.num_channels, num_res_blocks=args.num_res_blocks,
                diffusion_steps=args.diffusion_steps, lr=args.lr, batch_size=args.batch_size,
                ema_rate=args.ema_rate, max_steps=args.steps, seed=args.seed, log_interval=1, save_interval=0,
                keep_last=1, sample_every=0, run_dir=str(run_dir), device="cpu")
    return api.train_config(flat, preset_name="digits")


def train_variant(variant: Variant, args, run_root: Path, log) -> dict:
    """Train one variant into ``run_root/<name>``; returns its training record (curves + noise scale)."""
    run_dir = run_root / variant.name
    cfg = variant_config(variant, args, run_dir)
    prepared = build_trainer(cfg, run_dir=run_dir, progress=False)
    trainer = prepared.trainer
    trainer.sinks.close()  # replace console/TensorBoard sinks: one CSV row per step + our recorder
    probes = sorted({max(1, round(args.steps * f)) for f in (0.25, 0.5, 0.75, 1.0)})
    rec = StepRecorder(trainer, probes, make_noise_probe(cfg, args.noise_batches, args.seed + 1000))
    trainer.sinks = MultiSink([CSVSink(run_dir / "metrics.csv"), rec])
    t0 = time.perf_counter()
    error = None
    try:
        steps_done = trainer.run().step
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
    res = api.nll(run_dir, overrides=overrides, split="test", batch_size=min(128, args.nll_examples),
                  num_examples=args.nll_examples, seed=args.seed, device="cpu")
    out = dict(res.summary(), wall_s=res.seconds)
    out["per_example_bpd"] = res.per_example_bpd.tolist()
    return out


# ------------------------------------------------------------------------------------------------
# stage 3: FID vs sampling steps
# ------------------------------------------------------------------------------------------------
class FidReference(NamedTuple):
    """The FID reference: the digits CNN, the train split's feature statistics, and the record for results.json."""

    extractor: object
    stats: FeatureStats
    info: dict


def fid_of_images(images: np.ndarray, ref: FidReference) -> float:
    """digit-FID of uint8 NHWC ``images`` vs the reference (:func:`iddpm.api.evaluate`); NaN when the covariance is
    too ill-conditioned (very few samples)."""
    try:
        return float(api.evaluate(images, ref.stats, extractor=ref.extractor, metrics="fid")["fid"])
    except ConfigError:
        raise
    except ValueError:
        return float("nan")


def fid_reference(num_samples: int) -> FidReference:
    """The digits **train** split (what the models were trained on) as reference, and the data floor: the first
    ``min(num_samples, 360)`` held-out test digits scored like a sample set."""
    extractor = make_extractor("digits")
    stats = compute_stats(load_digits_split("train")[0][..., None], extractor)  # kept: the bootstraps need it
    floor_n = min(num_samples, 360)
    ref = FidReference(extractor, stats, {})
    floor = fid_of_images(load_digits_split("test")[0][:floor_n, ..., None], ref)
    ref.info.update(split="digits-train", num=int(stats.num), extractor=extractor.name, floor_fid=floor,
                    floor_num_test_images=floor_n)
    return ref


def sample_and_fid(run_dir: str, sampler: Sampler, steps: int, args, ref: FidReference) -> dict:
    """``steps``-step samples of a run (:func:`iddpm.api.sample`, seeded), their FID, its bootstrap standard error,
    the timing, and (popped by the caller) the images and their float64 [N, D] features."""
    respacing = f"ddim{steps}" if sampler.use_ddim else str(steps)
    res = api.sample(run_dir, overrides=sampler.overrides or None, timestep_respacing=respacing,
                     num_samples=args.num_samples, batch_size=min(args.num_samples, 256), seed=args.seed,
                     use_ddim=sampler.use_ddim, device="cpu")
    fid = fid_of_images(res.images, ref)
    features = compute_stats(res.images, ref.extractor).features
    se = fid_bootstrap_se(features, ref.stats, args.fid_bootstrap, args.seed) if math.isfinite(fid) else math.nan
    return {"steps": steps, "respacing": respacing, "fid": fid, "fid_bootstrap_se": se, "wall_s": res.seconds,
            "sec_per_1000_samples": res.seconds / args.num_samples * 1000.0, "images": res.images,
            "features": features}
