"""argparse flags generated from the config dataclasses, and the flat settings they were given.

Every flag is one dataclass field: its type, and the default its help shows, come from the field, and a flag
that is not given is absent from the namespace (``argparse.SUPPRESS``), so the dataclass default is the one
definition of each default.  Booleans accept the original's ``--flag True/False`` and a bare ``--flag``.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any

from iddpm.config import ALIASES, SECTIONS, RunConfig, parse_bool, resolve_train_config


def str2bool(v: str) -> bool:
    """argparse type for booleans (``True/False``, ``1/0``, ``yes/no``)."""
    try:
        return parse_bool(v)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_section_flags(group, cls: type, *, skip=(), shown=None, dests: dict[str, str] | None = None,
                      names: dict[str, list[str]] | None = None) -> None:
    """One ``--name`` flag per field of dataclass ``cls`` into ``group`` (default: not given).

    ``shown``: an instance whose values the help shows as defaults (else the field defaults).
    ``dests`` / ``names``: per field, another attribute name / other flag spellings (e.g. the original's).
    A field's ``metadata={"help": ...}`` is shown before its default.
    """
    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else None
        shown_value = getattr(shown, f.name) if shown is not None else default
        flag_names = [f"--{f.name}"] + [f"--{a}" for a, t in ALIASES.items() if t == f.name]
        flag_names += (names or {}).get(f.name, [])
        about = f.metadata.get("help")  # a field's own help text (``field(metadata={"help": ...})``)
        help_text = f"(default: {shown_value!r})"
        kw: dict[str, Any] = dict(dest=(dests or {}).get(f.name, f.name), default=argparse.SUPPRESS,
                                  help=f"{about} {help_text}" if about else help_text)
        if isinstance(default, bool):
            kw.update(type=str2bool, nargs="?", const=True, metavar="BOOL")
        else:
            kw.update(type=type(default) if isinstance(default, (int, float)) else str)
        group.add_argument(*flag_names, **kw)


def add_config_flags(parser: argparse.ArgumentParser, sections=tuple(SECTIONS), skip=(), shown=None,
                     group_help: str | None = None) -> None:
    """The training config's flags, one argument group per section (``shown``: a RunConfig for the help)."""
    for sec in sections:
        group = parser.add_argument_group(f"{sec} settings", group_help)
        add_section_flags(group, SECTIONS[sec], skip=skip, shown=getattr(shown, sec) if shown is not None else None)


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=argparse.SUPPRESS, help="named preset (see `iddpm presets`)")
    parser.add_argument("--config", default=None, help="TOML, YAML or JSON config file (nested sections or flat)")
    parser.add_argument("--dry_run", action="store_true", help="print the resolved config and exit")


def given(args: argparse.Namespace, cls: type, dests: dict[str, str] | None = None) -> dict[str, Any]:
    """The fields of dataclass ``cls`` that were given as flags: ``{field: value}``."""
    dests = dests or {}
    return {f.name: getattr(args, dests.get(f.name, f.name)) for f in fields(cls)
            if hasattr(args, dests.get(f.name, f.name))}


def run_settings(args: argparse.Namespace, sections=tuple(SECTIONS)) -> dict[str, Any]:
    """The training-config flags given explicitly, flat (``{"lr": 1e-3, ...}``)."""
    flat: dict[str, Any] = {}
    for sec in sections:
        flat.update(given(args, SECTIONS[sec]))
    return flat


def resolve_run_config(args: argparse.Namespace, base: RunConfig | None = None,
                       embedded_default: bool = False) -> RunConfig:
    """defaults/base -> preset -> config file -> explicit flags, validated (see
    :func:`iddpm.config.resolve_train_config`)."""
    return resolve_train_config(run_settings(args), preset_name=getattr(args, "preset", "") or "",
                                config_file=getattr(args, "config", None), base=base,
                                embedded_default=embedded_default)
