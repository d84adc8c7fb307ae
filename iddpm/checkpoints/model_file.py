"""iddpm's standalone model file: one safetensors file whose metadata carries the full RunConfig.

Layout: tensors = the model's state_dict (the original's key names); metadata (all strings):
``"iddpm_format": "model/1"``, ``"iddpm_config": RunConfig.to_json()`` plus optional extra entries
(e.g. ``"step"``, ``"ema_rate"``, ``"source"``).  A file alone rebuilds its model and diffusion:
``load_model_file(path) -> (model, cfg)``.  Written atomically (temp file + rename).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from iddpm.build import build_model
from iddpm.checkpoints.openai import check_state_dict
from iddpm.config import ConfigError, RunConfig
from iddpm.runtime.atomic import atomic_save_safetensors, atomic_write_text

__all__ = ["FORMAT", "save_model_file", "read_model_file", "load_model_file"]

FORMAT = "model/1"
_RESERVED = ("iddpm_format", "iddpm_config")


def save_model_file(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    cfg: RunConfig,
    extra_metadata: dict[str, str] | None = None,
    *,
    sidecar: bool = False,
) -> Path:
    """Write ``state_dict`` + ``cfg`` to ``path`` (one safetensors file, atomically); returns the path.

    ``extra_metadata``: more string entries for the header (may not reuse ``iddpm_format`` /
    ``iddpm_config``).  ``sidecar=True`` also writes ``cfg`` as ``config.json`` beside the file.
    """
    path = Path(path)
    extra = dict(extra_metadata or {})
    clash = [k for k in extra if k in _RESERVED]
    if clash:
        raise ValueError(f"extra_metadata may not set {clash}: these keys are written by save_model_file")
    metadata = {str(k): str(v) for k, v in extra.items()}
    metadata.update({"iddpm_format": FORMAT, "iddpm_config": cfg.to_json()})
    atomic_save_safetensors(dict(state_dict), path, metadata=metadata)
    if sidecar:
        atomic_write_text(path.parent / "config.json", cfg.to_json() + "\n")
    return path


_ZIP = b"PK\x03\x04"
# torch.save's legacy (non-zip) format: a protocol-2 pickle whose first object is this magic number (a LONG1)
_TORCH_LEGACY = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_HEADER_LEN = 8  # a safetensors file: u64 little-endian header length N, then N bytes of JSON, then tensor data


def _safetensors_extent(path: Path, size: int) -> str | None:
    """What is wrong with a file that starts like a safetensors file (its JSON header opens with ``{``), or None."""
    with open(path, "rb") as f:
        head = f.read(_HEADER_LEN + 1)
        if len(head) <= _HEADER_LEN or head[_HEADER_LEN:] != b"{":
            return None
        n = int.from_bytes(head[:_HEADER_LEN], "little")
        if _HEADER_LEN + n > size:
            return (f"a truncated safetensors file (its header says {n} header bytes follow, the file has only "
                    f"{size - _HEADER_LEN})")
        f.seek(_HEADER_LEN)
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
            return "a safetensors file with a damaged header"
    if _HEADER_LEN + n + max(ends, default=0) > size:
        return "a truncated safetensors file (it ends before the tensor data its header lists)"
    return "a damaged safetensors file"


def _sniff(path: Path) -> str:
    """What a file that safetensors could not read looks like, from its first bytes (for the error message)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(len(_TORCH_LEGACY))
    if head.startswith(_ZIP):
        return "a PyTorch zip checkpoint (torch.save)"
    if head.startswith(_TORCH_LEGACY):
        return "a Python pickle (legacy torch.save)"
    damaged = _safetensors_extent(path, size)
    if damaged:
        return damaged
    if size < _HEADER_LEN:
        return f"not a safetensors file (only {size} bytes)"
    if int.from_bytes(head[:_HEADER_LEN], "little") + _HEADER_LEN > size:
        return "truncated or not a safetensors file (its header length points past the end of the file)"
    return "not a safetensors file"


_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
_CONVERTIBLE = ("a PyTorch zip checkpoint (torch.save)", "a Python pickle (legacy torch.save)")


def _config_json(path, text: str) -> dict:
    """The ``iddpm_config`` metadata parsed: a JSON object, else a one-line ConfigError naming the file."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: iddpm_config metadata is not valid JSON ({exc.msg}); the file is damaged or "
                          "was not written by iddpm") from None
    except RecursionError:
        raise ConfigError(f"{path}: iddpm_config metadata is nested too deeply to be a config; the file is damaged "
                          "or was not written by iddpm") from None
    if not isinstance(value, dict):
        kind = _JSON_KINDS.get(type(value), type(value).__name__)
        raise ConfigError(f"{path}: iddpm_config metadata is a JSON {kind}, not an object of config sections; the "
                          "file is damaged or was not written by iddpm")
    return value


def read_model_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], RunConfig, dict[str, str]]:
    """Read an iddpm model file: ``(state_dict on CPU, RunConfig, metadata dict)``.

    Raises :class:`ConfigError` (one line) for a missing file, a non-safetensors file (e.g. a renamed
    ``.pt`` pickle -- convert those with ``iddpm convert-openai``), or a safetensors file without iddpm
    metadata.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such model file")
    try:
        with safe_open(str(p), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        state_dict = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        kind = _sniff(p)
        hint = " (an original improved-diffusion .pt? run `iddpm convert-openai FILE.pt --preset NAME`)" \
            if kind in _CONVERTIBLE else ""
        raise ConfigError(f"{path}: cannot read as safetensors, it is {kind}{hint} [{type(exc).__name__}]") from None
    fmt = metadata.get("iddpm_format")
    if fmt is None or "iddpm_config" not in metadata:
        raise ConfigError(
            f"{path}: a safetensors file without iddpm metadata (no iddpm_format/iddpm_config); "
            "it was not written by iddpm -- use a checkpoint from `iddpm train` or `iddpm convert-openai`"
        )
    if fmt != FORMAT:
        raise ConfigError(f"{path}: iddpm_format {fmt!r} is not supported (expected {FORMAT!r}); upgrade iddpm")
    cfg_dict = _config_json(path, metadata["iddpm_config"])
    cfg = RunConfig.from_dict(cfg_dict, source=f"{path} [iddpm_config]")
    return state_dict, cfg, metadata


def load_model_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, RunConfig]:
    """Rebuild the model stored in ``path`` and load its weights strictly: ``(model in eval mode, RunConfig)``.

    The model is built on the meta device and its parameters are taken from the file (no random
    init pass); floating-point weights become float32.  A key/shape mismatch raises ConfigError.
    """
    state_dict, cfg, _ = read_model_file(path)
    check_state_dict(state_dict, cfg, source=str(path))
    with torch.device("meta"):
        model = build_model(cfg)
    state_dict = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device).eval(), cfg
