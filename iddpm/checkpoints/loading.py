"""Loading a trained model for sampling / NLL, and converting the original's ``.pt`` files.

:func:`load_trained` turns what ``--run PATH`` names (run directory, step folder, iddpm ``.safetensors`` or an
improved-diffusion ``.pt``) into ``(model, sampling diffusion, RunConfig, weights file)``;
:func:`convert_openai` writes an original ``.pt`` as iddpm's self-describing model file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from iddpm.build import build_model, build_sampling_diffusion, with_respacing
from iddpm.checkpoints.model_file import load_model_file, save_model_file
from iddpm.checkpoints.openai import check_state_dict, guess_preset, load_openai_checkpoint, load_openai_state_dict
from iddpm.checkpoints.run_dir import RUN_HINT, pick_weights_file, resolve_checkpoint
from iddpm.config import ConfigError, RunConfig, SourceConfig, apply_overrides, preset, resolve_train_config, section_of
from iddpm.runtime.distributed import resolve_device

__all__ = ["load_trained", "convert_openai"]


def load_trained(source: SourceConfig, overrides: dict[str, Any] | None, timestep_respacing: str | None,
          device: torch.device | None = None):
    """``(model in eval mode on device, sampling diffusion, cfg, weights file)`` for ``source``.

    ``source.run``: a run directory, a step folder, an iddpm ``.safetensors`` or an original ``.pt``
    (see :func:`iddpm.api.load_run`); ``device`` None = ``source.device``."""
    file = resolve_checkpoint(source.run)
    if file.suffix == ".pt":
        cfg = _openai_config(file, source, overrides)
        state_dict = load_openai_checkpoint(file, cfg)  # checked against cfg's model: one-line error on mismatch
        with torch.device("meta"):
            model = build_model(cfg)
        model.load_state_dict(state_dict, strict=True, assign=True)
    else:
        if source.preset:
            raise ConfigError(f"--preset {source.preset}: only for the original's .pt checkpoints; {source.run} "
                              "carries its own settings (drop --preset)")
        if file.is_dir():
            file = pick_weights_file(file, source.use_ema, source.ema_rate)
        elif file.suffix != ".safetensors":
            raise ConfigError(f"--run {source.run}: unknown checkpoint type {file.suffix!r}; {RUN_HINT}")
        model, cfg = load_model_file(file, device="cpu")
        cfg = _diffusion_overrides(cfg, overrides, str(file))
    diffusion = build_sampling_diffusion(cfg, timestep_respacing)
    model = model.to(device if device is not None else resolve_device(source.device)).eval()
    return model, diffusion, with_respacing(cfg, timestep_respacing), file


def _openai_config(file: Path, source: SourceConfig, overrides: dict[str, Any] | None) -> RunConfig:
    """The settings of an original ``.pt``: ``--preset`` (or the released file's own), then the flags."""
    name = source.preset
    if not name and not overrides:
        name = guess_preset(file)  # only the exact file names of the released checkpoints
        if name is None:
            raise ConfigError(f"--run {source.run}: the original's .pt checkpoints carry no settings; add --preset "
                              "NAME (see `iddpm presets`) or the model/diffusion flags")
    cfg = preset(name) if name else RunConfig()
    if overrides:
        cfg = apply_overrides(cfg, dict(overrides), source="flags")
    return cfg.validate()


def _diffusion_overrides(cfg: RunConfig, overrides: dict[str, Any] | None, source: str) -> RunConfig:
    if not overrides:
        return cfg
    bad = [k for k in overrides if section_of(k) == "model"]
    if bad:
        raise ConfigError(f"--{bad[0]}: {source} stores its model settings; drop the flag (it cannot change the "
                          "network of a trained checkpoint)")
    return apply_overrides(cfg, dict(overrides), source="flags").validate()


def convert_openai(checkpoint: str | os.PathLike, output: str | os.PathLike | None = None, *,
                   settings: dict[str, Any] | None = None, preset_name: str = "",
                   config_file: str | os.PathLike | None = None, force: bool = False, sidecar: bool = False,
                   dry_run: bool = False, log: Callable[[str], None] | None = None) -> tuple[Path | None, RunConfig]:
    """An improved-diffusion ``.pt`` -> iddpm's model file (safetensors + the full config in its metadata).

    The file is read with ``torch.load(weights_only=True)`` and checked against the model of ``preset_name`` /
    ``config_file`` / ``settings`` (model and diffusion flags; a mismatch names the keys and the preset that
    fits).  With neither preset nor config file, a released file name or the one preset whose layout fits picks
    the preset.  Returns ``(output path or None for a dry run, config)``.
    """
    src = Path(checkpoint)
    state_dict = load_openai_state_dict(src)
    if not preset_name and not config_file:
        guessed = guess_preset(src, state_dict)
        if guessed is not None:
            preset_name = guessed
            if log:
                log(f"using --preset {guessed}")
    cfg = resolve_train_config(settings, preset_name=preset_name, config_file=config_file)
    if dry_run:
        return None, cfg
    check_state_dict(state_dict, cfg, source=str(src))
    out = Path(output) if output else src.with_suffix(".safetensors")
    if out.resolve() == src.resolve():
        raise ConfigError(f"-o {out}: would overwrite the input; choose another output path")
    if out.exists() and not force:
        raise ConfigError(f"-o {out}: file exists; pass --force to overwrite or choose another path")
    state_dict = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}
    save_model_file(out, state_dict, cfg, extra_metadata={"source": src.name, "converted_by": "iddpm convert-openai"},
                    sidecar=sidecar)
    if log:
        n_params = sum(v.numel() for v in state_dict.values())
        log(f"wrote {out} ({len(state_dict)} tensors, {n_params:,} parameters, preset {cfg.preset or '(flags)'})")
    return out, cfg

