"""Named presets: flat overrides on top of the defaults, and the resolution order of a training config.

Resolution (later wins): defaults -> ``preset`` -> config file -> explicit settings.  With no data and no
preset a training run uses the ``digits`` preset (the bundled 8x8 digits), wherever it is started from
(CLI, :func:`iddpm.api.train` or a config file).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from iddpm.config.core import ConfigError
from iddpm.config.run import SECTIONS, RunConfig, apply_overrides

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport (a declared dependency there)
    import tomli as tomllib

__all__ = ["PRESETS", "RELEASED_CHECKPOINTS", "ALIASES", "preset", "load_config_file", "resolve_train_config",
           "uses_embedded_default"]

# --------------------------------------------------------------------------------------------
# Presets.  Flat overrides on top of the defaults.  The five released models use the flags of
# the original README (see ../shared/reference/unet_keys.json); note their differing
# rescale_timesteps / rescale_learned_sigmas.
# --------------------------------------------------------------------------------------------
_RELEASED_COMMON = dict(learn_sigma=True, noise_schedule="cosine", diffusion_steps=4000, num_heads=4,
                        attention_resolutions="16,8", use_scale_shift_norm=True)

PRESETS: dict[str, dict[str, Any]] = {
    # tiny CPU preset for the bundled 8x8 digits
    "digits": dict(image_size=8, in_channels=1, num_channels=64, num_res_blocks=2, channel_mult="1,2",
                   attention_resolutions="4", num_heads=4, dropout=0.0, learn_sigma=True,
                   noise_schedule="cosine", diffusion_steps=1000, class_cond=False, num_classes=10,
                   rescale_timesteps=True, rescale_learned_sigmas=True, lr=2e-4, batch_size=64,
                   ema_rate="0.999", use_scale_shift_norm=True),
    # 32x32x3, 64 channels, 2 res blocks, attention at 16 and 8, learned sigmas
    "cifar-small": dict(image_size=32, in_channels=3, num_channels=64, num_res_blocks=2, channel_mult="1,2,2,2",
                        attention_resolutions="16,8", num_heads=4, dropout=0.1, learn_sigma=True,
                        noise_schedule="cosine", diffusion_steps=4000, rescale_timesteps=True,
                        rescale_learned_sigmas=True, lr=1e-4, batch_size=32),
    "cifar10_uncond": dict(_RELEASED_COMMON, image_size=32, num_channels=128, num_res_blocks=3, dropout=0.3,
                           rescale_timesteps=True, rescale_learned_sigmas=True, lr=1e-4, batch_size=128),
    "imagenet64_uncond": dict(_RELEASED_COMMON, image_size=64, num_channels=128, num_res_blocks=3,
                              rescale_timesteps=True, rescale_learned_sigmas=True, lr=1e-4, batch_size=128),
    "imagenet64_cond": dict(_RELEASED_COMMON, image_size=64, num_channels=192, num_res_blocks=3, class_cond=True,
                            num_classes=1000, rescale_timesteps=False, rescale_learned_sigmas=False,
                            lr=3e-4, batch_size=2048),
    "upsample256": dict(_RELEASED_COMMON, image_size=256, small_size=64, num_channels=192, num_res_blocks=2,
                        noise_schedule="linear", class_cond=True, num_classes=1000, rescale_timesteps=False,
                        rescale_learned_sigmas=False, lr=3e-4, batch_size=256),
    "lsun_bedroom": dict(image_size=256, num_channels=128, num_res_blocks=2, num_heads=1, attention_resolutions="16",
                         learn_sigma=True, noise_schedule="linear", diffusion_steps=1000,
                         use_scale_shift_norm=False, dropout=0.0, rescale_timesteps=False,
                         rescale_learned_sigmas=False, lr=1e-4, batch_size=128),
}

# The released checkpoint file each preset loads.
RELEASED_CHECKPOINTS = {
    "cifar10_uncond": "cifar10_uncond_50M_500K.pt",
    "imagenet64_uncond": "imagenet64_uncond_100M_1500K.pt",
    "imagenet64_cond": "imagenet64_cond_270M_250K.pt",
    "upsample256": "upsample_cond_500K.pt",
    "lsun_bedroom": "lsun_uncond_100M_1200K_bs128.pt",
}


def preset(name: str, base: RunConfig | None = None) -> RunConfig:
    """The :class:`RunConfig` of a named preset (on top of ``base`` or the defaults)."""
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: unknown; choose one of {', '.join(sorted(PRESETS))}")
    cfg = apply_overrides(base or RunConfig(), PRESETS[name], source=f"preset {name}")
    return dataclasses.replace(cfg, preset=name)


# Settings accepted under a second name for compatibility with the original's scripts.
ALIASES = {"large_size": "image_size"}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML / YAML / JSON config file into a dict; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    suffix = p.suffix.lower()
    parsers = {".toml": tomllib.loads, ".yaml": yaml.safe_load, ".yml": yaml.safe_load, ".json": json.loads}
    if suffix not in parsers:
        raise ConfigError(f"--config {path}: unknown extension {suffix!r}; use .toml, .yaml/.yml or .json")
    try:
        data = parsers[suffix](p.read_text())
    except Exception as exc:  # parse errors of any of the three parsers
        raise ConfigError(f"--config {path}: cannot parse ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a table of settings at the top level")
    return data


def flatten_config_dict(data: dict[str, Any]) -> dict[str, Any]:
    """A nested (``[model] ...``) or flat (``lr = 1e-4``) config dict -> flat ``{setting: value}`` (no preset)."""
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if k == "preset":
            continue
        if k in SECTIONS and isinstance(v, dict):
            flat.update({ALIASES.get(n, n): x for n, x in v.items()})
        else:
            flat[ALIASES.get(k, k)] = v
    return flat


def uses_embedded_default(preset_name: str, settings: dict[str, Any]) -> bool:
    """True when a fresh training run names neither data nor preset: it then trains the ``digits`` preset."""
    if preset_name or settings.get("resume") or settings.get("resume_checkpoint"):
        return False
    return str(settings.get("data_dir", "")) in ("", "digits")


def resolve_train_config(settings: dict[str, Any] | None = None, *, preset_name: str = "",
                         config_file: str | Path | None = None, base: RunConfig | None = None,
                         embedded_default: bool = False) -> RunConfig:
    """defaults (or ``base``) -> preset -> config file -> ``settings`` (flat), validated.

    ``embedded_default`` (what ``iddpm train`` and :func:`iddpm.api.train` use): with no ``base``, no preset
    and no data anywhere, start from the ``digits`` preset rather than the original's 64x64 RGB defaults.
    """
    settings = dict(settings or {})
    file_data = load_config_file(config_file) if config_file else {}
    file_flat = flatten_config_dict(file_data)
    preset_name = preset_name or str(file_data.get("preset", ""))
    cfg = base or RunConfig()
    if embedded_default and base is None and uses_embedded_default(preset_name, {**file_flat, **settings}):
        preset_name = "digits"
    if preset_name:
        cfg = preset(preset_name, cfg)
    if file_flat:
        cfg = apply_overrides(cfg, file_flat, source=f"--config {config_file}")
    if settings:
        cfg = apply_overrides(cfg, {ALIASES.get(k, k): v for k, v in settings.items()}, source="flags")
    return cfg.validate()
