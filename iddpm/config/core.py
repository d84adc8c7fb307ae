"""What every config section shares: the one-line error type, list / bool parsing, and typed coercion.

Each section is a frozen dataclass whose field defaults are the single definition of that setting's
default; flags (``iddpm.cli.args``), config files and API keywords are all coerced to the field's type
here, so a setting is parsed the same way wherever it comes from.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import fields
from typing import Any

__all__ = [
    "ConfigError",
    "parse_bool",
    "parse_int_list",
    "parse_float_list",
    "coerce_field",
    "section_from_dict",
    "replace_checked",
    "check_finite",
    "split_settings",
]

_TRUE = ("1", "true", "yes", "y", "t")
_FALSE = ("0", "false", "no", "n", "f")


class ConfigError(ValueError):
    """A bad setting; the message is one line naming the flag/file and the fix."""


def parse_bool(value: Any) -> bool:
    """``True/False``, ``1/0``, ``yes/no`` (any case) -> bool; anything else raises ValueError."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    low = str(value).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    """Parse ``"16,8"`` -> ``(16, 8)``; empty string -> ``()``."""
    text = str(text).strip()
    if not text:
        return ()
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"--{flag} {text!r}: expected comma-separated integers, e.g. 16,8") from None


def parse_float_list(text: str, flag: str) -> tuple[float, ...]:
    """Parse ``"0.9999,0.999"`` -> ``(0.9999, 0.999)``."""
    text = str(text).strip()
    if not text:
        return ()
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"--{flag} {text!r}: expected comma-separated numbers, e.g. 0.9999") from None


def check_finite(section: Any) -> None:
    """Every float field of a dataclass instance must be finite (``--lr nan`` / ``inf`` are one-line errors)."""
    for f in fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{f.name} {value}: must be a finite number")


def coerce_field(f: dataclasses.Field, value: Any, where: str) -> Any:
    """``value`` (from a flag, a file or a keyword) as the type of field ``f``'s default."""
    typ = type(f.default)
    try:
        if typ is bool:
            return parse_bool(value)
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            if isinstance(value, (list, tuple)):
                return ",".join(str(v) for v in value)
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {f.name}={value!r} is not a valid {typ.__name__}") from None
    return value


def section_from_dict(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    """An instance of dataclass ``cls`` from a dict of its fields; unknown keys are an error naming ``where``."""
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {type(values).__name__}")
    return replace_checked(cls(), values or {}, where)


def replace_checked(section: Any, values: dict[str, Any], where: str) -> Any:
    """``dataclasses.replace(section, **values)`` with every value coerced; unknown names are a ConfigError."""
    names = {f.name: f for f in fields(section)}
    out = {}
    for k, v in values.items():
        if k not in names:
            raise ConfigError(f"{where}: unknown key {k!r}")
        out[k] = coerce_field(names[k], v, where)
    return dataclasses.replace(section, **out)


def split_settings(what: str, kwargs: dict[str, Any], *sections: tuple[type, Any]) -> list[Any]:
    """Keyword settings spread over ``(dataclass, instance or None)`` sections: each section gets the keywords
    that are its field names (coerced and checked); a keyword no section has is a one-line error naming ``what``."""
    out, left = [], dict(kwargs)
    for cls, given in sections:
        names = {f.name for f in fields(cls)}
        mine = {k: left.pop(k) for k in list(left) if k in names}
        out.append(replace_checked(given or cls(), mine, what))
    if left:
        raise ConfigError(f"{what}: unknown setting {sorted(left)[0]!r}")
    return out

