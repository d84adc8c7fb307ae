"""Import of the original improved-diffusion ``.pt`` checkpoints, and state_dict layout checks.

The original's files are plain ``state_dict`` pickles; they are read **only** with
``torch.load(path, map_location="cpu", weights_only=True)`` (no arbitrary code runs).  Before a
state_dict is used it is checked against the model a config builds; a mismatch raises a one-line
:class:`~iddpm.config.ConfigError` naming the first missing / unexpected / wrongly shaped keys, what
the file looks like (channels, classes, learned sigmas) and the preset(s) whose layout fits -- a
wrong flag never silently produces noise.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

from iddpm.config import PRESETS, RELEASED_CHECKPOINTS, ConfigError, RunConfig, preset

__all__ = [
    "Layout",
    "model_layout",
    "state_dict_layout",
    "fitting_presets",
    "describe_state_dict",
    "check_state_dict",
    "load_openai_state_dict",
    "load_openai_checkpoint",
    "guess_preset",
]

Layout = dict[str, tuple[int, ...]]
_SHOW = 3  # keys listed per category in error messages


def model_layout(cfg: RunConfig) -> Layout:
    """``{key: shape}`` of the state_dict of the model ``cfg`` builds (built on the meta device: no memory)."""
    from iddpm.build import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    return state_dict_layout(model.state_dict())


def state_dict_layout(state_dict: dict[str, torch.Tensor]) -> Layout:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def fitting_presets(layout: Layout) -> list[str]:
    """Names of the presets (``iddpm.config.PRESETS``) whose model has exactly this key/shape layout."""
    fits = []
    for name in PRESETS:
        try:
            if model_layout(preset(name)) == layout:
                fits.append(name)
        except ConfigError:  # pragma: no cover - presets are valid
            continue
    return fits


def describe_state_dict(state_dict: dict[str, torch.Tensor] | Layout) -> str:
    """What a U-Net state_dict looks like, from its shapes: e.g. ``num_channels=128, learn_sigma=True``."""
    layout = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in state_dict.items()}
    parts = []
    if "time_embed.0.weight" in layout:
        parts.append(f"num_channels={layout['time_embed.0.weight'][1]}")
    in_shape = layout.get("input_blocks.0.0.weight")
    out_shape = layout.get("out.2.weight")
    if in_shape and out_shape:
        # learned sigmas double the output channels; super-res doubles the network's input channels
        parts.append(f"network input channels {in_shape[1]}, output channels {out_shape[0]}")
    if "label_emb.weight" in layout:
        parts.append(f"class_cond=True with {layout['label_emb.weight'][0]} classes")
    else:
        parts.append("class_cond=False")
    n_in = len({k.split(".")[1] for k in layout if k.startswith("input_blocks.")})
    n_attn = sum(1 for k in layout if k.endswith(".qkv.weight"))
    parts.append(f"{n_in} input blocks, {n_attn} attention blocks")
    return ", ".join(parts)


def check_state_dict(state_dict: dict[str, torch.Tensor], cfg: RunConfig, source: str) -> None:
    """Raise :class:`ConfigError` unless ``state_dict`` has exactly the keys/shapes of ``cfg``'s model."""
    expected = model_layout(cfg)
    got = state_dict_layout(state_dict)
    if got == expected:
        return
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} file {list(got[k])} vs model {list(expected[k])}" for k in expected
              if k in got and got[k] != expected[k]]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:_SHOW])}{more}")
    fits = fitting_presets(got)
    used = f"preset {cfg.preset}" if cfg.preset else "the given flags"
    if cfg.preset and cfg.preset in fits:
        hint = f"it fits preset {cfg.preset} as is: drop the model flags that change it"
    elif fits:
        hint = f"it fits --preset {' / '.join(fits)}"
    else:
        hint = f"no preset fits; the file has {describe_state_dict(got)} -- set the model flags to match"
    raise ConfigError(f"{source} does not match the model of {used}: {'; '.join(problems)}; {hint}")


def _refusal_message(path: Path, torch_message: str) -> str:
    """Our one-line message for a file ``torch.load(weights_only=True)`` refused to unpickle."""
    found = re.search(r"GLOBAL ([\w.]+)", torch_message)
    holds = f"Python objects (e.g. {found.group(1)})" if found else "pickled Python data"
    out = path.with_name(f"{path.stem}_state_dict.pt")
    command = (f"python -c \"import torch; torch.save(torch.load({str(path)!r}, weights_only=False)['model'], "
               f"{str(out)!r})\"")
    return (f"{path}: not a plain state_dict of tensors: it holds {holds}, refused because unpickling it could run "
            f"arbitrary code; only if you trust the file, convert it yourself with {command} (use the key that holds "
            f"the weights in place of 'model') and pass {out.name}")


def _load_error(path: Path, exc: Exception) -> str:
    """A one-line description of why ``torch.load(weights_only=True)`` could not read ``path``."""
    text = str(exc).strip()
    if "Unsupported global" in text:
        return _refusal_message(path, text)
    if "PytorchStreamReader" in text:
        return f"{path}: a damaged or truncated PyTorch zip file (torch.load could not read its archive)"
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n|$)", text) or re.search(r"^\s*(\S.*?)\s*$", text, re.M)
    detail = f"{type(exc).__name__}: {found.group(1)[:120]}" if found else type(exc).__name__
    return f"{path}: not a state_dict torch.load can read safely ({detail}); expected the original's .pt state_dict"


def _check_magic(path: Path) -> None:
    """Refuse (one line) a file that is neither a torch.save zip archive nor a pickle, before unpickling anything."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head.startswith(b"PK") or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return
    raise ConfigError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle); expected "
                      "the original's .pt state_dict")


def load_openai_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an improved-diffusion ``.pt`` state_dict safely (``weights_only=True``) onto the CPU.

    A file holding other Python objects is refused (one line saying why and how to convert a trusted file);
    nothing in it is executed.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such checkpoint file")
    _check_magic(p)
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols: our message says what matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refusals, corrupt zip, not a torch file
        raise ConfigError(_load_error(p, exc)) from None
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):  # tolerate the common {"state_dict": ...} nesting
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{path}: not a model state_dict (expected a dict of tensors, got {type(obj).__name__})")
    return dict(obj)


def guess_preset(path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> str | None:
    """The preset for a released file name (``cifar10_uncond_50M_500K.pt`` -> ``cifar10_uncond``), else the
    single preset whose layout fits ``state_dict``, else None."""
    name = Path(path).name
    for preset_name, filename in RELEASED_CHECKPOINTS.items():
        if name == filename:
            return preset_name
    if state_dict is not None:
        fits = fitting_presets(state_dict_layout(state_dict))
        if len(fits) == 1:
            return fits[0]
    return None


def load_openai_checkpoint(
    path: str | os.PathLike, cfg: RunConfig, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Read a ``.pt`` file, check it against ``cfg``'s model and return its state_dict (floats as ``dtype``).

    Raises :class:`ConfigError` (one line, with the fitting preset) on any key/shape mismatch.
    """
    state_dict = load_openai_state_dict(path)
    check_state_dict(state_dict, cfg, source=str(path))
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
