"""Export iddpm models as diffusers ``DDPMPipeline`` folders; import ``UNet2DModel`` pipeline folders into iddpm.

Folder layout (what ``diffusers.DDPMPipeline.from_pretrained(folder)`` loads)::

    model_index.json
    unet/config.json                              UNet2DModel settings (see iddpm.checkpoints.diffusers_unet)
    unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json               DDPMScheduler: num_train_timesteps = T, betas, variance_type
    README.md                                     model card (exports only)

Schedules: cosine -> ``beta_schedule="squaredcos_cap_v2"`` (diffusers computes the very same float64 formula);
linear -> ``trained_betas`` (iddpm's float64 ``np.linspace``; diffusers' own float32 linspace differs in the last
bits).  Variances: learned sigmas -> ``learned_range``, ``--sigma_small`` -> ``fixed_small``, else
``fixed_large``; ``--predict_xstart`` -> ``prediction_type="sample"``.  ``pipe(num_inference_steps=T)`` is iddpm's
ancestral sampler step for step, and ``timestep_spacing="linspace"`` picks the steps of ``--timestep_respacing N``
for the usual N (10, 25, 50, 100, 250, 500; a count whose positions fall half-way may round one step apart).
diffusers keeps ``alphas_cumprod`` in float32, which moves its first few steps by up to ~1e-3 from iddpm's float64
tables; with float64 tables the steps agree to ~1e-6.  Exports are written atomically (temporary sibling + rename).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iddpm import __version__
from iddpm.checkpoints.diffusers_unet import (
    from_diffusers_state,
    model_flags_from_unet2d,
    to_diffusers_state,
    unet2d_config,
)
from iddpm.checkpoints.openai import check_state_dict
from iddpm.config import ConfigError, DiffusionConfig, RunConfig, apply_overrides
from iddpm.diffusion.schedules import get_named_beta_schedule
from iddpm.runtime.atomic import atomic_directory

__all__ = ["check_exportable", "scheduler_config", "diffusion_flags_from_scheduler", "export_pipeline",
           "import_pipeline", "model_card"]

_INSTALL = "pip install 'iddpm[diffusers]'"
# Settings the mapping knows; a new model/diffusion setting with a non-default value is refused, not ignored.
_MODEL_KEYS = {"image_size", "in_channels", "num_channels", "num_res_blocks", "num_heads", "num_heads_upsample",
               "attention_resolutions", "channel_mult", "dropout", "class_cond", "num_classes", "use_checkpoint",
               "use_scale_shift_norm", "small_size"}
_DIFFUSION_KEYS = {"diffusion_steps", "noise_schedule", "timestep_respacing", "learn_sigma", "sigma_small",
                   "use_kl", "predict_xstart", "rescale_timesteps", "rescale_learned_sigmas"}


def _diffusers():
    # diffusers is an optional, heavy dependency: imported only by the functions that build its objects.
    try:
        import diffusers
    except ImportError:
        raise ConfigError(f"diffusers is not installed; {_INSTALL} (or pip install diffusers)") from None
    return diffusers


def check_exportable(cfg: RunConfig) -> None:
    """Raise a one-line ConfigError unless ``UNet2DModel`` + ``DDPMScheduler`` reproduce ``cfg``'s model exactly."""
    for section, known in (("model", _MODEL_KEYS), ("diffusion", _DIFFUSION_KEYS)):
        current, default = getattr(cfg, section), type(getattr(cfg, section))()
        for key in sorted({f.name for f in dataclasses.fields(current)} - known):
            if getattr(current, key) != getattr(default, key):
                raise ConfigError(f"--{key} {getattr(current, key)}: the diffusers export does not know this setting; "
                                  "export a model that leaves it at its default")
    m, d = cfg.model, cfg.diffusion
    if m.super_res:
        raise ConfigError(f"--small_size {m.small_size}: super-resolution models need a low-resolution input that "
                          "UNet2DModel / DDPMPipeline have no slot for; only base models export")
    if d.rescale_timesteps and d.diffusion_steps != 1000:
        raise ConfigError(f"--rescale_timesteps True with --diffusion_steps {d.diffusion_steps}: the model saw "
                          f"t * 1000 / {d.diffusion_steps} but diffusers feeds the raw step t; only T = 1000 or "
                          "--rescale_timesteps False export exactly")
    unet2d_config(cfg)  # the network's own refusals (channel_mult, attention head dims)


def scheduler_config(d: DiffusionConfig) -> dict[str, Any]:
    """``DDPMScheduler(**kwargs)`` arguments for the (unrespaced) diffusion of ``d``."""
    T = d.diffusion_steps
    conf: dict[str, Any] = dict(
        num_train_timesteps=T,
        variance_type="learned_range" if d.learn_sigma else ("fixed_small" if d.sigma_small else "fixed_large"),
        prediction_type="sample" if d.predict_xstart else "epsilon",
        clip_sample=True,  # iddpm's --clip_denoised default
        clip_sample_range=1.0,
        timestep_spacing="linspace",
    )
    if d.noise_schedule == "cosine":
        conf["beta_schedule"] = "squaredcos_cap_v2"
    else:
        scale = 1000 / T
        conf.update(beta_schedule="linear", beta_start=scale * 0.0001, beta_end=scale * 0.02,
                    trained_betas=get_named_beta_schedule("linear", T).tolist())
    return conf


def _schedule_from_betas(betas: np.ndarray, T: int, source: str) -> str:
    for name in ("linear", "cosine"):
        if name == "linear" and T < 21:
            continue
        ref = get_named_beta_schedule(name, T)
        if betas.shape == ref.shape and np.max(np.abs(betas - ref) / ref) < 1e-6:
            return name
    raise ConfigError(f"{source}: trained_betas are neither iddpm's linear nor its cosine schedule for T={T}; "
                      "iddpm can only run those two")


def diffusion_flags_from_scheduler(conf: dict[str, Any], source: str = "scheduler/scheduler_config.json") -> dict:
    """Diffusion flags (``iddpm.config`` names) of a DDPMScheduler config; ConfigError naming the key otherwise.

    Sampling-only options (clip_sample, thresholding, timestep_spacing, steps_offset) are not part of the model
    and are left to iddpm's own sampling flags.  The model receives raw integer steps (``rescale_timesteps=False``).
    """
    T = int(conf.get("num_train_timesteps", 1000))
    if conf.get("rescale_betas_zero_snr", False):
        raise ConfigError(f"{source}: rescale_betas_zero_snr=true: iddpm has no zero-terminal-SNR schedule")
    if conf.get("trained_betas") is not None:
        schedule = _schedule_from_betas(np.asarray(conf["trained_betas"], dtype=np.float64), T, source)
    else:
        kind = conf.get("beta_schedule", "linear")
        if kind == "squaredcos_cap_v2":
            schedule = "cosine"
        elif kind == "linear":
            start, end, scale = float(conf.get("beta_start", 0.0001)), float(conf.get("beta_end", 0.02)), 1000 / T
            if abs(start / (scale * 0.0001) - 1) > 1e-6 or abs(end / (scale * 0.02) - 1) > 1e-6:
                raise ConfigError(f"{source}: beta_start={start}, beta_end={end}: iddpm's linear schedule for T={T} "
                                  f"runs from {scale * 0.0001:g} to {scale * 0.02:g}")
            schedule = "linear"
        else:
            raise ConfigError(f"{source}: beta_schedule={kind!r}: iddpm supports linear and squaredcos_cap_v2")
    variance = conf.get("variance_type")
    known = {"learned_range": (True, False), "fixed_small": (False, True), "fixed_small_log": (False, True),
             "fixed_large": (False, False)}
    if variance not in known:
        raise ConfigError(f"{source}: variance_type={variance!r}: iddpm maps learned_range, fixed_small(_log) and "
                          "fixed_large; set one of them")
    prediction = conf.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "sample"):
        raise ConfigError(f"{source}: prediction_type={prediction!r}: iddpm models predict epsilon or the sample")
    learn_sigma, sigma_small = known[variance]
    return dict(diffusion_steps=T, noise_schedule=schedule, learn_sigma=learn_sigma, sigma_small=sigma_small,
                predict_xstart=prediction == "sample", rescale_timesteps=False, timestep_respacing="")


def _format(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def model_card(cfg: RunConfig, card: dict[str, Any] | None = None) -> str:
    """The export's README.md: how to load it, the measured numbers in ``card`` and the training configuration."""
    m, d = cfg.model, cfg.diffusion
    T = d.diffusion_steps
    kind = f"class-conditional ({m.num_classes} classes)" if m.class_cond else "unconditional"
    lines = ["---", "library_name: diffusers",
             f"pipeline_tag: {'image-generation' if m.class_cond else 'unconditional-image-generation'}",
             "tags: [iddpm, improved-diffusion, ddpm]", "---", "",
             f"# iddpm {m.image_size}x{m.image_size}x{m.in_channels} {kind} diffusion model", "",
             f"An Improved DDPM (Nichol & Dhariwal 2021) model exported by iddpm {__version__} as a diffusers "
             "`UNet2DModel` + `DDPMScheduler` that compute the same function as the iddpm model.", "",
             "```python", "from diffusers import DDPMPipeline", 'pipe = DDPMPipeline.from_pretrained("THIS_FOLDER")',
             f"images = pipe(batch_size=4, num_inference_steps={T}).images  # {T} steps = iddpm's ancestral sampler",
             "```", ""]
    if m.class_cond:
        lines += ["DDPMPipeline passes no labels: call `pipe.unet(x, t, class_labels=y)` in your own loop.", ""]
    if card:
        lines += ["## Run", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {_format(v)} |" for k, v in card.items()] + [""]
    mult = m.channel_mult or "(default for the size)"
    lines += ["## Configuration", "",
              f"- network: {m.num_channels} channels, channel_mult {mult}, {m.num_res_blocks} res blocks per level, "
              f"attention at {m.attention_resolutions or 'the middle only'} ({m.num_heads} heads), "
              f"scale-shift norm {m.use_scale_shift_norm}, dropout {m.dropout}",
              f"- diffusion: {d.noise_schedule} schedule, T = {T}, learned sigmas {d.learn_sigma}, "
              f"predict_xstart {d.predict_xstart}, use_kl {d.use_kl}, "
              f"rescale_learned_sigmas {d.rescale_learned_sigmas}",
              "", "<details><summary>full iddpm config</summary>", "", "```json", cfg.to_json(), "```", "</details>",
              ""]
    return "\n".join(lines)


def export_pipeline(state_dict: dict[str, torch.Tensor], cfg: RunConfig, out_dir: str | os.PathLike, *,
                    card: dict[str, Any] | None = None) -> Path:
    """Write ``state_dict`` (iddpm U-Net keys) + ``cfg`` as a DDPMPipeline folder at ``out_dir``; returns the path.

    ``card``: numbers for the model card (e.g. ``{"NLL (bits/dim)": 3.1, "FID": 9.8}``).  Refuses (ConfigError)
    models UNet2DModel cannot express exactly (:func:`check_exportable`), weights that do not fit ``cfg`` and an
    existing non-empty ``out_dir``.  Needs diffusers (to check the weights against UNet2DModel and to save).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: already exists and is not empty; choose a new folder (exports never overwrite)")
    check_exportable(cfg)
    check_state_dict(state_dict, cfg, source="export state_dict")
    diffusers = _diffusers()
    with torch.device("meta"):
        unet = diffusers.UNet2DModel(**unet2d_config(cfg))
    unet.load_state_dict(to_diffusers_state(state_dict, cfg), strict=True, assign=True)  # diffusers' own layout
    scheduler = diffusers.DDPMScheduler(**scheduler_config(cfg.diffusion))
    pipe = diffusers.DDPMPipeline(unet=unet.eval(), scheduler=scheduler)
    with atomic_directory(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").write_text(model_card(cfg, card), encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; an export is meant to be shared
    return out


def _read_json(path: Path, folder: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{folder}: no {path.relative_to(folder)}; expected a diffusers pipeline folder "
                          "(model_index.json, unet/, scheduler/)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _read_unet_weights(unet_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = unet_dir / "diffusion_pytorch_model.safetensors"
    index = unet_dir / "diffusion_pytorch_model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single), device="cpu")
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return {k: v for s in shards for k, v in load_file(str(unet_dir / s), device="cpu").items()}
    legacy = unet_dir / "diffusion_pytorch_model.bin"
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise ConfigError(f"{unet_dir}: no diffusion_pytorch_model.safetensors (or .bin) weights")


def import_pipeline(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], RunConfig]:
    """Read a diffusers pipeline folder with a UNet2DModel of the DDPM/ADM shape: ``(iddpm state_dict, RunConfig)``.

    The model section comes from ``unet/config.json``, the diffusion section from
    ``scheduler/scheduler_config.json`` (schedule, T, variance type -> learn_sigma / sigma_small, prediction type).
    Data/train settings are iddpm's defaults.  Anything that does not map exactly is a one-line ConfigError
    naming the file and key.  Needs no diffusers install.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{folder}: no such folder; give a diffusers pipeline folder (model_index.json, unet/)")
    unet_conf = _read_json(root / "unet" / "config.json", root)
    sched_conf = _read_json(root / "scheduler" / "scheduler_config.json", root)
    model_flags, out_channels = model_flags_from_unet2d(unet_conf, source=str(root / "unet" / "config.json"))
    sched_source = str(root / "scheduler" / "scheduler_config.json")
    diffusion_flags = diffusion_flags_from_scheduler(sched_conf, source=sched_source)
    want = model_flags["in_channels"] * (2 if diffusion_flags["learn_sigma"] else 1)
    if out_channels != want:
        raise ConfigError(f"{root / 'unet' / 'config.json'}: out_channels={out_channels} does not fit variance_type="
                          f"{sched_conf.get('variance_type')!r} in {sched_source} (needs {want})")
    cfg = apply_overrides(RunConfig(), {**model_flags, **diffusion_flags}, source=str(root)).validate()
    weights = _read_unet_weights(root / "unet")
    state_dict = from_diffusers_state(weights, cfg, flip_sin_to_cos=bool(unet_conf.get("flip_sin_to_cos", True)),
                                      source=str(root / "unet"))
    check_state_dict(state_dict, cfg, source=str(root / "unet"))
    return state_dict, cfg


def run_card(run: str | os.PathLike, use_ema: bool, ema_rate) -> dict[str, Any]:
    """Model-card numbers of a run: the weights used and ``RUN_DIR/nll.json`` (``iddpm nll`` / demo) when present."""
    card: dict[str, Any] = {"weights": (f"EMA {ema_rate}" if ema_rate is not None else "EMA") if use_ema else "raw"}
    p = Path(run)
    run_dir = p.parent if p.is_file() else p
    if run_dir.parent.name == "checkpoints":  # a checkpoints/step_* folder (or a file inside one)
        run_dir = run_dir.parent.parent
    nll_file = run_dir / "nll.json"
    if nll_file.is_file():
        try:
            summary = json.loads(nll_file.read_text(encoding="utf-8"))
            card["NLL (bits/dim)"] = f"{float(summary['bpd']):.4f} +- {float(summary['bpd_stderr']):.4f} " \
                                     f"({int(summary['num_examples'])} examples, {nll_file.name})"
        except (ValueError, KeyError, TypeError):  # not an iddpm nll summary: leave it out of the card
            pass
    return card
