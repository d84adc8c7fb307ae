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


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch zip checkpoint (torch.save)"
    if head[:1] == b"\x80":
        return "a Python pickle (legacy torch.save)"
    return "not a safetensors file"


def read_model_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], RunConfig, dict[str, str]]:
    """Read an iddpm model file: ``(state_dict on CPU, RunConfig, metadata dict)``.

    Raises :class:`ConfigError` (one line) for a missing file, a non-safetensors file (e.g. a renamed
    ``.pt`` pickle -- convert those with ``iddpm convert-openai``), or a safetensors file without iddpm
    metadata.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such model file")
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        state_dict = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        kind = _sniff(p)
        hint = " (an original improved-diffusion .pt? run `iddpm convert-openai FILE.pt --preset NAME`)" \
            if kind != "not a safetensors file" else ""
        raise ConfigError(f"{path}: cannot read as safetensors, it is {kind}{hint} [{type(exc).__name__}]") from None
    fmt = metadata.get("iddpm_format")
    if fmt is None or "iddpm_config" not in metadata:
        raise ConfigError(
            f"{path}: a safetensors file without iddpm metadata (no iddpm_format/iddpm_config); "
            "it was not written by iddpm -- use a checkpoint from `iddpm train` or `iddpm convert-openai`"
        )
    if fmt != FORMAT:
        raise ConfigError(f"{path}: iddpm_format {fmt!r} is not supported (expected {FORMAT!r}); upgrade iddpm")
    try:
        cfg_dict = json.loads(metadata["iddpm_config"])
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: iddpm_config metadata is not valid JSON ({exc.msg})") from None
    cfg = RunConfig.from_dict(cfg_dict, source=f"{path} [iddpm_config]")
    return state_dict, cfg, metadata


def load_model_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, RunConfig]:
    """Rebuild the model stored in ``path`` and load its weights strictly: ``(model in eval mode, RunConfig)``.

    The model is built on the meta device and its parameters are taken from the file (no random
    init pass); floating-point weights become float32.  A key/shape mismatch raises ConfigError.
    """
    from iddpm.build import build_model
    from iddpm.checkpoints.openai import check_state_dict

    state_dict, cfg, _ = read_model_file(path)
    check_state_dict(state_dict, cfg, source=str(path))
    with torch.device("meta"):
        model = build_model(cfg)
    state_dict = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device).eval(), cfg
