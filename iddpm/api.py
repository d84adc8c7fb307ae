"""The one wiring hub: ``train``, ``sample``, ``upsample``, ``nll``, ``evaluate`` and ``load_run``.

Every CLI command and ``benchmarks/`` call these functions; nothing below this module imports it.  Settings are
the typed dataclasses of :mod:`iddpm.config` (``SampleConfig``, ``NLLConfig``, ``EvalConfig``, ``SourceConfig``):
pass one, or its field names as keywords (``api.sample("runs/digits", num_samples=64, seed=3)``); their field
defaults are the only defaults.  Under ``torchrun`` sampling and NLL share the work between the processes and
rank 0 gets the merged result (the other ranks get None).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from iddpm.build import (
    build_diffusion,
    build_model,
    build_sampling_diffusion,
    guidance_capable,
    null_label,
    with_respacing,
)
from iddpm.checkpoints.diffusers_bridge import export_pipeline, import_pipeline, run_card
from iddpm.checkpoints.loading import convert_openai, load_trained
from iddpm.checkpoints.model_file import save_model_file
from iddpm.checkpoints.run_dir import pick_weights_file, resolve_checkpoint
from iddpm.config import (
    ConfigError,
    EvalConfig,
    NLLConfig,
    RunConfig,
    SampleConfig,
    SourceConfig,
    apply_overrides,
    resolve_train_config,
    split_settings,
)
from iddpm.diffusion import classifier_free_guidance
from iddpm.eval.evaluate import evaluate as evaluate_sets
from iddpm.eval.nll import NLLResult, compute_nll_share, merge_nll_shares, nll_data, save_nll
from iddpm.eval.report import plot_run as draw_run_report
from iddpm.models import optimize
from iddpm.runtime.atomic import atomic_write_text
from iddpm.runtime.distributed import distributed_context, resolve_device
from iddpm.sample import SampleResult, gather_results, generate, plan_sampling
from iddpm.sample import upsample as upsample_images
from iddpm.sample.folder import check_out_folder, finish_result
from iddpm.sample.superres import base_images, check_superres_inputs
from iddpm.train.app import load_saved_run_config
from iddpm.train.app import train as train_run
from iddpm.train.trainer import TrainResult

__all__ = ["load_run", "sample", "upsample", "nll", "evaluate", "train", "train_config", "plot_run", "convert_openai",
           "export_diffusers", "import_diffusers", "build_model", "build_diffusion", "resolve_checkpoint",
           "pick_weights_file"]

Log = Callable[[str], None] | None


# --------------------------------------------------------------------------------------------
# Loading a trained model: run directory, checkpoint folder, model file, or the original's .pt
# --------------------------------------------------------------------------------------------
def load_run(path: str | os.PathLike, *, use_ema: bool = True, ema_rate: float | str | None = None,
             preset: str | None = None, overrides: dict[str, Any] | None = None, device: str | torch.device = "auto",
             timestep_respacing: str | None = None):
    """Load a trained model and its diffusion: ``(model in eval mode on device, diffusion, RunConfig)``.

    path: a run directory (its latest checkpoint), a ``checkpoints/step_*`` folder, one of iddpm's
        ``.safetensors`` model files (the config travels in its metadata), or an improved-diffusion ``.pt``
        (settings from ``preset`` and/or ``overrides``, e.g. ``preset="cifar10_uncond"``; a released file
        under its original name, e.g. ``cifar10_uncond_50M_500K.pt``, picks its preset by itself).
    use_ema / ema_rate: EMA weights (default; see :func:`pick_weights_file` for which rate) or the raw weights.
    overrides: flat ``{flag: value}`` settings; for iddpm checkpoints only diffusion settings may change
        (e.g. ``{"rescale_timesteps": False}``); for ``.pt`` files any model/diffusion setting.
    timestep_respacing: sampling respacing (``"50"``, ``"ddim25"``, ``"10,15,20"``); None keeps the config's.
        The returned config records it (``cfg.diffusion.timestep_respacing``).
    """
    source = SourceConfig(run=os.fspath(path), preset=preset or "", use_ema=use_ema,
                          ema_rate="" if ema_rate is None else str(ema_rate), device=str(device), fast=False)
    model, diffusion, cfg, _ = load_trained(source, overrides, timestep_respacing)
    return model, diffusion, cfg


def _objects(what: str, run, model, diffusion, cfg, source: SourceConfig, overrides, timestep_respacing,
             device: torch.device, log: Log, what_steps: str = "timesteps"):
    """(model, diffusion, cfg, weights) from ``run`` or from the given objects; the model on ``device``.
    ``log`` gets one line saying what was loaded (``what_steps``: how to call the diffusion's steps)."""
    if run is not None or source.run:
        source = dataclasses.replace(source, run=os.fspath(run)) if run is not None else source
        model, diffusion, cfg, file = load_trained(source, overrides, timestep_respacing, device)
        if log:
            label = str(file)
            if file.suffix == ".pt":
                label += f" (preset {cfg.preset})" if cfg.preset else " (settings from flags)"
            log(f"loaded {label} on {device}; {diffusion.num_timesteps} {what_steps}")
        return model, diffusion, cfg, file
    if model is None or diffusion is None:
        raise ConfigError(f"{what}: pass a run (directory / checkpoint) or both model= and diffusion=")
    if timestep_respacing is not None:
        if cfg is None:
            raise ConfigError(f"{what}: timestep_respacing needs cfg= (or pass a respaced diffusion)")
        diffusion = build_sampling_diffusion(cfg, timestep_respacing)
        cfg = with_respacing(cfg, timestep_respacing)
    if isinstance(model, torch.nn.Module):  # a given network runs where the samples are drawn (device=...)
        model = model.to(device)
    return model, diffusion, cfg, None


def _device(spec: str, model) -> torch.device:
    """``--device``; ``auto`` with a given model means the model's own device."""
    if spec == "auto" and model is not None and callable(getattr(model, "parameters", None)):
        for p in model.parameters():
            return p.device
    return resolve_device(spec)


# --------------------------------------------------------------------------------------------
# sample / upsample
# --------------------------------------------------------------------------------------------
def sample(run: str | os.PathLike | None = None, settings: SampleConfig | None = None, *, model=None,
           diffusion=None, cfg: RunConfig | None = None, source: SourceConfig | None = None,
           overrides: dict[str, Any] | None = None, timestep_respacing: str | None = None, classes=None,
           image_shape: tuple[int, int, int] | None = None, num_classes: int | None = None, x_T=None,
           return_float: bool = False, return_trajectory: bool = False, progress: bool = False, save: bool = False,
           log: Log = None, **kwargs: Any) -> SampleResult | None:
    """Generate images: ``iddpm.api.sample("runs/digits", num_samples=64).images`` -> uint8 (N, H, W, C).

    Either ``run`` (anything :func:`load_run` accepts) or ``model`` + ``diffusion`` (+ ``cfg`` or ``image_shape``
    / ``num_classes``).  ``kwargs``: fields of :class:`~iddpm.config.SampleConfig` (num_samples, batch_size,
    seed, use_ddim, eta, clip_denoised, ...) and :class:`~iddpm.config.SourceConfig` (use_ema, ema_rate, preset,
    device, fast).  ``timestep_respacing`` (e.g. ``"ddim25"`` with ``use_ddim=True``) rebuilds the diffusion from
    the config.  ``sampler="dpm++2m", steps=15`` (``schedule=`` uniform / logsnr / karras): a few-step solver
    on the full T-step diffusion, NFE = steps (see :mod:`iddpm.sample.plan`).  ``classes``: None
    (``settings.classes``), an int, ``"balanced"`` or a list of labels.
    ``guidance_scale`` W: classifier-free guidance of a model trained with ``class_dropout > 0`` (1 = plain
    conditional, 0 = unconditional; see :func:`_sampling_model`).  The same
    ``seed`` gives the same images whatever ``batch_size`` (and number of processes).  ``save=True`` writes
    ``settings.out`` (npz, grid, sample_info.json).  Returns :class:`iddpm.sample.SampleResult` (None off rank 0).
    """
    if isinstance(kwargs.get("ema_rate"), float):
        kwargs["ema_rate"] = str(kwargs["ema_rate"])
    if isinstance(classes, (str, int)) and not isinstance(classes, bool):  # a SampleConfig.classes spelling
        kwargs["classes"], classes = str(classes), None
    settings, source = split_settings("sample", kwargs, (SampleConfig, settings), (SourceConfig, source))
    settings = settings.validate()
    if save:
        check_out_folder(settings.out)  # before any work: a bad --out costs nothing
    plan = plan_sampling(settings, timestep_respacing)  # --sampler / --steps / --schedule (solvers: full T)
    labels = settings.class_spec() if classes is None else classes
    with distributed_context(source.device if model is None else "cpu") as ctx:
        device = ctx.device if model is None else _device(source.device, model)
        model, diffusion, cfg, weights = _objects("sample", run, model, diffusion, cfg, source, overrides,
                                                  plan.timestep_respacing, device, log if ctx.is_main else None,
                                                  plan.steps_kind(settings.eta))
        plan, diffusion, cfg = plan.bind(diffusion, cfg)
        shape, num_classes = _sample_shape(cfg, image_shape, num_classes, x_T)
        start = time.perf_counter()
        part = generate(
            _sampling_model(model, cfg, settings, source), diffusion, num_samples=settings.num_samples,
            batch_size=settings.batch_size, image_shape=shape, seed=settings.seed, **plan.loop_kwargs(),
            eta=settings.eta, clip_denoised=settings.clip_denoised, classes=labels, num_classes=num_classes,
            device=device, progress=progress and ctx.is_main, rank=ctx.rank, world_size=ctx.world_size,
            return_trajectory=return_trajectory or bool(settings.trajectory), return_float=return_float, x_T=x_T)
        parts = ctx.all_gather_object(part)
    if not ctx.is_main:
        return None
    result = gather_results(parts)
    return finish_result(result, settings, source, cfg, diffusion, weights, time.perf_counter() - start, save,
                   plan=plan, classes=labels)


def _sampling_model(model, cfg: RunConfig | None, settings: SampleConfig, source: SourceConfig):
    """What every sampler runs: the network (fast path with ``source.fast``), wrapped for classifier-free guidance
    when ``settings.guidance_scale`` != 1 (:func:`iddpm.diffusion.classifier_free_guidance`).  The one place
    guidance is applied, so ancestral, DDIM and the solvers all get it; refused (one line) for a model without
    an unconditional branch (trained without ``--class_dropout``)."""
    w = settings.guidance_scale
    if w != 1.0:
        if w < 0:
            raise ConfigError(f"--guidance_scale {w:g}: must be >= 0 (0 unconditional, 1 plain conditional, "
                              "> 1 guided)")
        if cfg is None:
            raise ConfigError(f"--guidance_scale {w:g}: with model= pass cfg= (guidance needs its class_dropout)")
        if not cfg.model.class_cond:
            raise ConfigError(f"--guidance_scale {w:g}: the model is unconditional (trained without --class_cond); "
                              "guidance needs a class-conditional model trained with --class_dropout > 0")
        if not guidance_capable(cfg):
            raise ConfigError(f"--guidance_scale {w:g}: the model was trained without label dropout "
                              "(--class_dropout 0), so it has no unconditional branch to guide with; retrain with "
                              "--class_dropout 0.1 or sample with --guidance_scale 1")
    net = optimize(model, "sample") if source.fast else model
    if w == 1.0:
        return net
    return classifier_free_guidance(net, w, null_label(cfg), learned_sigma=cfg.diffusion.learn_sigma)


def _sample_shape(cfg, image_shape, num_classes, x_T):
    if cfg is not None:
        if cfg.model.super_res:
            raise ConfigError("sample: a super-resolution model; use `iddpm upsample --base_samples FILE.npz` "
                              "(iddpm.api.upsample)")
        image_shape = image_shape or (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
        if num_classes is None and cfg.model.class_cond:
            num_classes = cfg.model.num_classes
    if image_shape is None:
        if x_T is None:
            raise ConfigError("sample: pass cfg= or image_shape=(C, H, W) with a bare model")
        image_shape = tuple(x_T.shape[1:])
    return image_shape, num_classes


def upsample(run: str | os.PathLike, base_samples, settings: SampleConfig | None = None, *,
             source: SourceConfig | None = None, overrides: dict[str, Any] | None = None,
             timestep_respacing: str | None = None, return_trajectory: bool = False, progress: bool = False,
             save: bool = False, log: Log = None, **kwargs: Any) -> SampleResult | None:
    """Super-resolve base samples with a super-res run/checkpoint (the original's ``super_res_sample.py``).

    base_samples: a samples ``.npz`` path (arr_0 uint8 NHWC, arr_1 labels) or a uint8 (N, h, w, C) array
    (or an ``(images, labels)`` pair).  ``settings.num_samples`` > 0 keeps only the first N (0 = all; the
    default for upsampling is all of them unless given).  Other settings as :func:`sample`.  Returns
    :class:`iddpm.sample.SampleResult` at the large size (None off rank 0).
    """
    kwargs.setdefault("num_samples", 0)
    settings, source = split_settings("upsample", kwargs, (SampleConfig, settings), (SourceConfig, source))
    settings = settings.validate(upsample=True)
    if save:
        check_out_folder(settings.out)  # before any work: a bad --out costs nothing
    plan = plan_sampling(settings, timestep_respacing)
    flag = f"--base_samples {base_samples}" if isinstance(base_samples, (str, os.PathLike)) else "--base_samples"
    images, labels = base_images(base_samples)
    if settings.num_samples:
        images, labels = images[: settings.num_samples], None if labels is None else labels[: settings.num_samples]
    with distributed_context(source.device) as ctx:
        model, diffusion, cfg, weights = _objects("upsample", run, None, None, None, source, overrides,
                                                  plan.timestep_respacing, ctx.device, log if ctx.is_main else None,
                                                  plan.steps_kind(settings.eta))
        plan, diffusion, cfg = plan.bind(diffusion, cfg)
        m = check_superres_inputs(cfg, images, labels, flag, run)
        start = time.perf_counter()
        part = upsample_images(
            _sampling_model(model, cfg, settings, source), diffusion, images, large_size=m.image_size,
            base_labels=labels, class_cond=m.class_cond, num_classes=m.num_classes if m.class_cond else None,
            batch_size=settings.batch_size, seed=settings.seed, **plan.loop_kwargs(), eta=settings.eta,
            clip_denoised=settings.clip_denoised, device=ctx.device, progress=progress and ctx.is_main,
            return_trajectory=return_trajectory or bool(settings.trajectory), rank=ctx.rank,
            world_size=ctx.world_size)
        parts = ctx.all_gather_object(part)
    if not ctx.is_main:
        return None
    return finish_result(gather_results(parts), settings, source, cfg, diffusion, weights, time.perf_counter() - start,
                   save, plan=plan,
                   base_samples=str(base_samples) if isinstance(base_samples, (str, os.PathLike)) else None)


# --------------------------------------------------------------------------------------------
# nll / evaluate
# --------------------------------------------------------------------------------------------
def nll(run: str | os.PathLike | None = None, settings: NLLConfig | None = None, *, model=None, diffusion=None,
        cfg: RunConfig | None = None, source: SourceConfig | None = None, overrides: dict[str, Any] | None = None,
        timestep_respacing: str | None = None, data=None, progress: bool = False, save: bool = False,
        log: Log = None, **kwargs: Any) -> NLLResult | None:
    """Bits/dim of a dataset under a trained model (``calc_bpd_loop``), with the per-timestep breakdown.

    Data: ``data`` (an iterable of ``(x, cond)`` batches) or the dataset of ``settings.data_dir`` (default: the
    run's data -- the bundled digits' ``split`` for digits runs).  ``kwargs``: fields of
    :class:`~iddpm.config.NLLConfig` / :class:`~iddpm.config.SourceConfig`.  ``save=True`` writes ``settings.out``.
    Under ``torchrun`` each process evaluates every world_size-th batch.  Returns
    :class:`iddpm.eval.nll.NLLResult` (None off rank 0).
    """
    if kwargs.get("num_examples") is None:
        kwargs.pop("num_examples", None)
    settings, source = split_settings("nll", kwargs, (NLLConfig, settings), (SourceConfig, source))
    settings = settings.validate()
    if run is None and cfg is None and data is None:
        raise ConfigError("nll: with model= and diffusion=, pass cfg= (to find the data) or data=")
    with distributed_context(source.device if model is None else "cpu") as ctx:
        device = ctx.device if model is None else _device(source.device, model)
        say = log if ctx.is_main else None
        model, diffusion, cfg, _ = _objects("nll", run, model, diffusion, cfg, source, overrides,
                                            timestep_respacing, device, say)
        if cfg is not None and cfg.model.super_res:
            raise ConfigError(f"--run {run}: NLL of super-resolution models is not supported (needs low_res inputs)")
        if say and cfg is not None and guidance_capable(cfg):
            say(f"class_dropout {cfg.model.class_dropout:g}: NLL conditional on the true labels (guidance_scale "
                "does not apply to likelihoods)")
        if data is None:
            data = nll_data(cfg, settings, say)
        start = time.perf_counter()
        share = compute_nll_share(optimize(model, "sample") if source.fast else model, diffusion, data,
                                  clip_denoised=settings.clip_denoised, device=device,
                                  progress=progress and ctx.is_main, seed=settings.seed,
                                  max_examples=settings.num_examples or None,
                                  use_labels=bool(cfg.model.class_cond) if cfg is not None else True,
                                  rank=ctx.rank, world_size=ctx.world_size)
        shares = ctx.all_gather_object(share)
    if not ctx.is_main:
        return None
    result = merge_nll_shares(shares, diffusion)
    result.seconds, result.num_processes = time.perf_counter() - start, ctx.world_size
    if settings.num_examples > result.num_examples and say:
        say(f"--num_examples {settings.num_examples}: the data has only {result.num_examples} examples; used all")
    if save:
        save_nll(result, settings.out)
    return result


def evaluate(samples, reference, settings: EvalConfig | None = None, *, progress: bool = False,
             json_out: str | os.PathLike | None = None, **kwargs: Any) -> dict[str, Any]:
    """FID / KID / IS / precision-recall between ``samples`` and ``reference`` (see :mod:`iddpm.eval.evaluate`).

    ``kwargs``: fields of :class:`~iddpm.config.EvalConfig` (``extractor`` may be an extractor object,
    ``metrics`` a tuple).  ``json_out``: also write the result there (atomically).
    """
    result = evaluate_sets(samples, reference, settings, progress=progress, **kwargs)
    if json_out:
        atomic_write_text(json_out, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------
def train_config(settings: dict[str, Any] | None = None, *, preset_name: str = "",
                 config_file: str | os.PathLike | None = None) -> RunConfig:
    """The RunConfig of a training invocation: defaults -> preset -> config file -> ``settings`` (flat flags).

    No data and no preset: the ``digits`` preset.  ``resume=True``: the run directory's ``config.json`` is the base
    (the settings still override it; model settings that differ are refused at start);
    ``resume_checkpoint=FILE``: that checkpoint's own config is.
    """
    cfg = resolve_train_config(settings, preset_name=preset_name, config_file=config_file, embedded_default=True)
    base = load_saved_run_config(cfg)
    if base is not None:
        cfg = resolve_train_config(settings, preset_name=preset_name, config_file=config_file, base=base)
    return cfg


def train(cfg: RunConfig | None = None, *, progress: bool = True, preset_name: str = "",
          config_file: str | os.PathLike | None = None, log: Log = None, **settings: Any) -> TrainResult:
    """Train (or continue) a run: ``iddpm.api.train(max_minutes=5, run_dir="runs/digits")`` trains the digits preset.

    ``cfg``: a full RunConfig (e.g. ``preset("cifar-small")``); otherwise ``settings`` are flat training flags
    resolved by :func:`train_config`.  Returns :class:`~iddpm.train.trainer.TrainResult` (step, stop reason,
    images/s, last checkpoint).  ``log`` gets one line saying what a resume restored, or that the run is already
    at its step limit (``stop_reason == "already_done"``; nothing is written).
    """
    if cfg is None:
        cfg = train_config(settings, preset_name=preset_name, config_file=config_file)
    elif settings:
        cfg = apply_overrides(cfg, settings, source="train").validate()
    return train_run(cfg, progress=progress, log=log)


# --------------------------------------------------------------------------------------------
# diffusers bridge
# --------------------------------------------------------------------------------------------
def export_diffusers(run: str | os.PathLike, out: str | os.PathLike, *, use_ema: bool = True,
                     ema_rate: float | str | None = None):
    """Export a trained model as a diffusers ``DDPMPipeline`` folder at ``out`` (new or empty); returns its Path.

    ``run``: anything :func:`load_run` accepts; EMA weights by default.  The model card lists the run's NLL from
    ``RUN_DIR/nll.json`` when present.  Models ``UNet2DModel`` cannot express exactly raise a one-line ConfigError.
    """
    model, _, cfg = load_run(run, use_ema=use_ema, ema_rate=ema_rate, device="cpu")
    return export_pipeline(model.state_dict(), cfg, out, card=run_card(run, use_ema, ema_rate))


def import_diffusers(folder: str | os.PathLike, out: str | os.PathLike):
    """Convert a diffusers pipeline folder (UNet2DModel + DDPMScheduler) into an iddpm model file ``out``.

    The file (weights + full RunConfig) works with ``iddpm sample / nll --run out``; returns its Path.
    """
    state_dict, cfg = import_pipeline(folder)
    return save_model_file(out, state_dict, cfg, extra_metadata={"source": str(folder),
                                                                 "converted_by": "iddpm import diffusers"})


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def plot_run(run: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """One PNG of a training run (``iddpm plot RUN``): training loss (total, mse, vb), loss per quarter of t, FID
    vs step from ``eval.csv`` (``--eval_every``) and the latest sample grid; written to ``out`` (default
    ``RUN_DIR/report.png``).  Returns its path.  Needs matplotlib (``pip install 'iddpm[plots]'``)."""
    return draw_run_report(run, out)
