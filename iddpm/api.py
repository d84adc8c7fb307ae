"""The one place that wires the rooms together.

``build_diffusion`` / ``build_model`` turn a :class:`~iddpm.config.RunConfig` into objects;
everything else (trainer, samplers, evaluation) receives those objects.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from iddpm.build import build_diffusion, build_model, build_sampling_diffusion  # noqa: F401 (re-exported)
from iddpm.config import ConfigError, RunConfig

# --------------------------------------------------------------------------------------------
# Loading a trained model: run directory, checkpoint folder, model file, or the original's .pt
# --------------------------------------------------------------------------------------------
_RUN_HINT = "give a run directory, a checkpoint folder, a .safetensors model file, or an improved-diffusion .pt"


def _latest_step_folder(run_dir: Path) -> Path:
    ckpts = run_dir / "checkpoints"
    steps = sorted(
        (p for p in ckpts.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()),
        key=lambda p: int(p.name[5:]),
    ) if ckpts.is_dir() else []
    if not steps:
        raise ConfigError(f"--run {run_dir}: no checkpoints yet (nothing in {ckpts}); train longer or pick a file")
    return steps[-1]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory (-> its latest ``checkpoints/step_*`` folder), a step folder or a file -> that path.

    Uses :func:`iddpm.checkpoints.run_dir.find_checkpoint` when available (same layout).
    """
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise ConfigError(f"--run {path}: no such file or directory; {_RUN_HINT}")
    if p.is_file():
        return p
    try:
        from iddpm.checkpoints.run_dir import find_checkpoint
    except ImportError:
        find_checkpoint = None
    if find_checkpoint is not None:
        return Path(find_checkpoint(p))
    if (p / "checkpoints").is_dir() or (p / "config.json").is_file():
        return _latest_step_folder(p)
    return p


def _ema_files(folder: Path) -> dict[float, Path]:
    out = {}
    for f in folder.glob("ema_*.safetensors"):
        try:
            out[float(f.name[len("ema_"):-len(".safetensors")])] = f
        except ValueError:
            continue
    return out


def _configured_ema_rates(model_file: Path) -> tuple[float, ...]:
    """The ``--ema_rate`` list recorded in a model file's config (header only; () when unreadable)."""
    import json

    try:
        from safetensors import safe_open

        with safe_open(str(model_file), framework="pt") as f:
            meta = f.metadata() or {}
        return RunConfig.from_dict(json.loads(meta["iddpm_config"])).train.ema_rates
    except Exception:  # not an iddpm file / no config: fall back to the largest rate
        return ()


def pick_weights_file(folder: Path, use_ema: bool = True, ema_rate: float | str | None = None) -> Path:
    """The weights file of a checkpoint folder: ``ema_<rate>.safetensors`` (EMA, default) or ``model.safetensors``.

    ``ema_rate`` None picks the only EMA file; with several, the first rate of the run's ``--ema_rate`` list
    (read from the checkpoint's config), else the largest rate.
    """
    if not use_ema:
        f = folder / "model.safetensors"
        if not f.is_file():
            raise ConfigError(f"--run {folder}: no model.safetensors in this checkpoint folder; {_RUN_HINT}")
        return f
    emas = _ema_files(folder)
    if not emas:
        if (folder / "model.safetensors").is_file():
            raise ConfigError(f"--run {folder}: no EMA weights (ema_*.safetensors) here; pass --no_ema for the raw "
                              "weights")
        raise ConfigError(f"--run {folder}: no model weights (model.safetensors / ema_*.safetensors); {_RUN_HINT}")
    if ema_rate is None:
        if len(emas) == 1:
            return next(iter(emas.values()))
        for r in _configured_ema_rates(next(iter(emas.values()))):
            for have, f in emas.items():
                if abs(have - r) < 1e-12:
                    return f
        return emas[max(emas)]
    rate = float(ema_rate)
    for r, f in emas.items():
        if abs(r - rate) < 1e-12:
            return f
    have = ", ".join(str(r) for r in sorted(emas, reverse=True))
    raise ConfigError(f"--ema_rate {ema_rate}: no ema_{ema_rate}.safetensors in {folder}; available rates: {have}")


def _apply_diffusion_overrides(cfg: RunConfig, overrides: dict[str, Any] | None, source: str) -> RunConfig:
    from iddpm.config import apply_overrides, section_of

    if not overrides:
        return cfg
    bad = [k for k in overrides if section_of(k) == "model"]
    if bad:
        raise ConfigError(f"--{bad[0]}: {source} stores its model settings; drop the flag (it cannot change the "
                          "network of a trained checkpoint)")
    return apply_overrides(cfg, dict(overrides), source="flags").validate()


def load_run(
    path: str | os.PathLike,
    *,
    use_ema: bool = True,
    ema_rate: float | str | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    timestep_respacing: str | None = None,
):
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
    from iddpm.config import apply_overrides
    from iddpm.config import preset as preset_config

    file = resolve_checkpoint(path)
    if file.is_file() and file.suffix == ".pt":
        if not preset and not overrides:
            from iddpm.checkpoints.openai import guess_preset

            preset = guess_preset(file)  # only the exact file names of the released checkpoints
            if preset is None:
                raise ConfigError(f"--run {path}: the original's .pt checkpoints carry no settings; add --preset NAME "
                                  "(see `iddpm presets`) or the model/diffusion flags")
        cfg = preset_config(preset) if preset else RunConfig()
        if overrides:
            cfg = apply_overrides(cfg, dict(overrides), source="flags")
        cfg = cfg.validate()
        model = _load_openai(file, cfg)
    else:
        if preset:
            raise ConfigError(f"--preset {preset}: only for the original's .pt checkpoints; {path} carries its own "
                              "settings (drop --preset)")
        if file.is_dir():
            file = pick_weights_file(file, use_ema, ema_rate)
        elif file.suffix != ".safetensors":
            raise ConfigError(f"--run {path}: unknown checkpoint type {file.suffix!r}; {_RUN_HINT}")
        from iddpm.checkpoints.model_file import load_model_file

        model, cfg = load_model_file(file, device="cpu")
        cfg = _apply_diffusion_overrides(cfg, overrides, str(file))
    diffusion = build_sampling_diffusion(cfg, timestep_respacing)
    if timestep_respacing is not None:  # the returned config describes the returned diffusion
        import dataclasses

        cfg = cfg.replace(diffusion=dataclasses.replace(cfg.diffusion, timestep_respacing=str(timestep_respacing)))
    model = model.to(device).eval()
    return model, diffusion, cfg


def _load_openai(file: Path, cfg: RunConfig):
    """Build the model of ``cfg`` and load an improved-diffusion ``.pt`` state_dict into it (strict)."""
    from iddpm.checkpoints.openai import load_openai_checkpoint

    state_dict = load_openai_checkpoint(file, cfg)  # checked against cfg's model: one-line error on mismatch
    with torch.device("meta"):
        model = build_model(cfg)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Notebook API: sample / upsample / nll / evaluate
# --------------------------------------------------------------------------------------------
def _fast(model, fast: bool):
    if not fast:
        return model
    from iddpm.models import optimize

    return optimize(model, mode="sample")


def _objects(what: str, run, model, diffusion, cfg, timestep_respacing, load_kwargs: dict):
    """(model, diffusion, cfg) from ``run`` (via :func:`load_run`) or from the given objects."""
    if run is not None:
        return load_run(run, timestep_respacing=timestep_respacing, **load_kwargs)
    if model is None or diffusion is None:
        raise ConfigError(f"{what}: pass a run (directory / checkpoint) or both model= and diffusion=")
    if timestep_respacing is not None:
        if cfg is None:
            raise ConfigError(f"{what}: timestep_respacing needs cfg= (or pass a respaced diffusion)")
        diffusion = build_sampling_diffusion(cfg, timestep_respacing)
    return model, diffusion, cfg


def sample(
    run: str | os.PathLike | None = None,
    *,
    model=None,
    diffusion=None,
    cfg: RunConfig | None = None,
    num_samples: int = 16,
    batch_size: int | None = None,
    seed: int = 0,
    timestep_respacing: str | None = None,
    use_ddim: bool = False,
    eta: float = 0.0,
    clip_denoised: bool = True,
    classes=None,
    use_ema: bool = True,
    ema_rate: float | str | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    fast: bool = True,
    progress: bool = False,
    return_trajectory: bool = False,
    image_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    x_T=None,
    return_float: bool = False,
):
    """Generate images: ``iddpm.api.sample("runs/digits", num_samples=64).images`` -> uint8 (N, H, W, C).

    Either ``run`` (anything :func:`load_run` accepts) or ``model`` + ``diffusion`` (+ ``cfg`` or
    ``image_shape`` / ``num_classes``).  ``timestep_respacing`` (e.g. ``"ddim25"`` with ``use_ddim=True``)
    rebuilds the diffusion from the config.  ``classes``: None (random), an int, ``"balanced"`` or a list.
    The same ``seed`` gives the same images whatever ``batch_size``.  Returns
    :class:`iddpm.sample.SampleResult` (``images``, ``labels``, optional ``trajectory`` / ``samples``).
    """
    from iddpm.sample import generate

    model, diffusion, cfg = _objects("sample", run, model, diffusion, cfg, timestep_respacing, dict(
        use_ema=use_ema, ema_rate=ema_rate, preset=preset, overrides=overrides, device=device))
    if cfg is not None:
        if cfg.model.super_res:
            raise ConfigError("sample: this is a super-resolution model; use iddpm.api.upsample / `iddpm upsample`")
        image_shape = image_shape or (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
        if num_classes is None and cfg.model.class_cond:
            num_classes = cfg.model.num_classes
    if image_shape is None:
        if x_T is None:
            raise ConfigError("sample: pass cfg= or image_shape=(C, H, W) with a bare model")
        image_shape = tuple(x_T.shape[1:])
    return generate(
        _fast(model, fast), diffusion, num_samples=num_samples, batch_size=batch_size or num_samples,
        image_shape=image_shape, seed=seed, use_ddim=use_ddim, eta=eta, clip_denoised=clip_denoised,
        classes=classes, num_classes=num_classes, device=device, progress=progress,
        return_trajectory=return_trajectory, return_float=return_float, x_T=x_T,
    )


def upsample(
    run: str | os.PathLike,
    base_samples,
    *,
    batch_size: int = 16,
    seed: int = 0,
    timestep_respacing: str | None = None,
    use_ddim: bool = False,
    eta: float = 0.0,
    clip_denoised: bool = True,
    use_ema: bool = True,
    ema_rate: float | str | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    fast: bool = True,
    progress: bool = False,
    return_trajectory: bool = False,
):
    """Super-resolve base samples with a super-res run/checkpoint (the original's ``super_res_sample.py``).

    base_samples: a samples ``.npz`` path (arr_0 uint8 NHWC, arr_1 labels) or a uint8 (N, h, w, C) array
    (or an ``(images, labels)`` pair).  Returns :class:`iddpm.sample.SampleResult` at the large size.
    """
    import numpy as np

    from iddpm.sample import load_npz
    from iddpm.sample import upsample as sr_upsample

    if isinstance(base_samples, (str, os.PathLike)):
        images, labels = load_npz(base_samples)
    elif isinstance(base_samples, tuple):
        images, labels = base_samples
    else:
        images, labels = np.asarray(base_samples), None
    model, diffusion, cfg = load_run(run, use_ema=use_ema, ema_rate=ema_rate, preset=preset, overrides=overrides,
                                     device=device, timestep_respacing=timestep_respacing)
    m = cfg.model
    if not m.super_res:
        raise ConfigError(f"--run {run}: not a super-resolution model (no small_size); use `iddpm sample`")
    if images.shape[1:3] != (m.small_size, m.small_size) or images.shape[-1] != m.in_channels:
        raise ConfigError(f"--base_samples: images are {images.shape[1]}x{images.shape[2]}x{images.shape[3]}, "
                          f"the model upsamples {m.small_size}x{m.small_size}x{m.in_channels}")
    return sr_upsample(
        _fast(model, fast), diffusion, images, large_size=m.image_size, base_labels=labels,
        class_cond=m.class_cond, num_classes=m.num_classes if m.class_cond else None, batch_size=batch_size,
        seed=seed, use_ddim=use_ddim, eta=eta, clip_denoised=clip_denoised, device=device, progress=progress,
        return_trajectory=return_trajectory,
    )


def nll(
    run: str | os.PathLike | None = None,
    *,
    model=None,
    diffusion=None,
    cfg: RunConfig | None = None,
    data_dir: str | None = None,
    split: str = "test",
    batch_size: int = 64,
    num_examples: int | None = None,
    timestep_respacing: str | None = None,
    clip_denoised: bool = True,
    seed: int = 0,
    use_ema: bool = True,
    ema_rate: float | str | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    fast: bool = True,
    progress: bool = False,
    data=None,
):
    """Bits/dim of a dataset under a trained model (``calc_bpd_loop``), with the per-timestep breakdown.

    Data: ``data`` (an iterable of ``(x, cond)`` batches) or the dataset of ``data_dir`` (default: the run's
    data setting -- the bundled digits' ``split`` for digits runs).  Returns :class:`iddpm.eval.nll.NLLResult`.
    """
    from iddpm.eval.nll import compute_nll

    if run is None and cfg is None and data is None:
        raise ConfigError("nll: with model= and diffusion=, pass cfg= (to find the data) or data=")
    model, diffusion, cfg = _objects("nll", run, model, diffusion, cfg, timestep_respacing, dict(
        use_ema=use_ema, ema_rate=ema_rate, preset=preset, overrides=overrides, device=device))
    use_labels = bool(cfg.model.class_cond) if cfg is not None else True
    if data is None:
        data = nll_loader(cfg, data_dir=data_dir, split=split, batch_size=batch_size)
    return compute_nll(_fast(model, fast), diffusion, data, clip_denoised=clip_denoised, device=device,
                       progress=progress, seed=seed, max_examples=num_examples, use_labels=use_labels)


def nll_loader(cfg: RunConfig, *, data_dir: str | None = None, split: str = "test", batch_size: int = 64):
    """Ordered batches (no shuffle, no flips, last batch kept) of the evaluation data for ``cfg``'s model."""
    import dataclasses

    from iddpm.data import load_dataset, make_loader

    dcfg = dataclasses.replace(cfg.data, random_flip=False)
    if data_dir is not None:
        dcfg = dataclasses.replace(dcfg, data_dir=data_dir)
    ds = load_dataset(dcfg, cfg.model.image_size, cfg.model.in_channels, split=split,
                      with_labels=cfg.model.class_cond)
    return make_loader(ds, batch_size, shuffle=False, seed=0, drop_last=False)


def evaluate(samples, reference, **kwargs):
    """FID / KID / IS / precision-recall between ``samples`` and ``reference`` (see :mod:`iddpm.eval.evaluate`)."""
    try:
        from iddpm.eval.evaluate import evaluate as _evaluate
    except ImportError as exc:  # pragma: no cover - only while the metrics module is absent
        raise ConfigError(f"evaluate: the metrics module is not available ({exc})") from None
    return _evaluate(samples, reference, **kwargs)
