"""argparse flags generated from the config dataclasses, and resolution of a RunConfig.

Resolution order (later wins): defaults -> ``--preset`` -> ``--config FILE`` -> explicit flags.
Booleans accept the original's ``--flag True/False`` and a bare ``--flag``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from iddpm.config import (
    ConfigError,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    preset,
)

SECTIONS = {"model": ModelConfig, "diffusion": DiffusionConfig, "data": DataConfig, "train": TrainConfig}

# Flags accepted under a second name for compatibility with the original's scripts.
ALIASES = {"large_size": "image_size"}


def str2bool(v: str) -> bool:
    low = str(v).strip().lower()
    if low in ("1", "true", "yes", "y", "t"):
        return True
    if low in ("0", "false", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {v!r}")


def add_config_flags(parser: argparse.ArgumentParser, sections=tuple(SECTIONS), skip=(), shown=None,
                     group_help: str | None = None) -> None:
    """Add one ``--name`` flag per field of the given config sections (default: not given).

    ``shown``: a :class:`RunConfig` whose values the help shows as defaults (e.g. the demo's preset);
    without it the help shows the dataclass defaults.  ``group_help``: a description of each section's group
    (e.g. where the defaults come from)."""
    for sec in sections:
        group = parser.add_argument_group(f"{sec} settings", group_help)
        for f in fields(SECTIONS[sec]):
            if f.name in skip:
                continue
            default = f.default if f.default is not MISSING else None
            shown_value = getattr(getattr(shown, sec), f.name) if shown is not None else default
            names = [f"--{f.name}"] + [f"--{a}" for a, t in ALIASES.items() if t == f.name]
            kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=f"(default: {shown_value!r})")
            if isinstance(default, bool):
                kw.update(type=str2bool, nargs="?", const=True, metavar="BOOL")
            elif isinstance(default, int):
                kw.update(type=int)
            elif isinstance(default, float):
                kw.update(type=float)
            else:
                kw.update(type=str)
            group.add_argument(*names, **kw)


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=argparse.SUPPRESS, help="named preset (see `iddpm presets`)")
    parser.add_argument("--config", default=None, help="TOML, YAML or JSON config file (nested sections or flat)")
    parser.add_argument("--dry_run", action="store_true", help="print the resolved config and exit")


def load_config_file(path: str) -> dict[str, Any]:
    """Read a config file into a dict; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = p.read_text()
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            return tomllib.loads(text)
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
            return data or {}
        if suffix == ".json":
            return json.loads(text)
    except Exception as exc:  # parse errors from any of the three parsers
        raise ConfigError(f"--config {path}: cannot parse ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    raise ConfigError(f"--config {path}: unknown extension {suffix!r}; use .toml, .yaml/.yml or .json")


def config_dict_to_run_config(base: RunConfig, data: dict[str, Any], source: str) -> RunConfig:
    """Apply a nested (``[model] ...``) or flat (``lr = 1e-4``) config dict onto ``base``."""
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if k == "preset":
            continue
        if k in SECTIONS and isinstance(v, dict):
            flat.update(v)
        else:
            flat[ALIASES.get(k, k)] = v
    return apply_overrides(base, flat, source=source)


def resolve_run_config(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """defaults/base -> preset -> config file -> explicit flags, then validate."""
    cfg = base or RunConfig()
    file_data: dict[str, Any] = {}
    if getattr(args, "config", None):
        file_data = load_config_file(args.config)
    preset_name = getattr(args, "preset", None) or file_data.get("preset")
    if preset_name:
        cfg = preset(preset_name, cfg)
    if file_data:
        cfg = config_dict_to_run_config(cfg, file_data, source=f"--config {args.config}")
    flat = {}
    for sec in SECTIONS:
        for f in fields(SECTIONS[sec]):
            if hasattr(args, f.name):
                flat[f.name] = getattr(args, f.name)
    if flat:
        cfg = apply_overrides(cfg, flat, source="flags")
    return cfg.validate()
