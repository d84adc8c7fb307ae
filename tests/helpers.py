"""Helpers shared by several test files (importable because pytest puts ``tests/`` on sys.path for conftest.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

# The original implementation's numbers: ../shared/reference beside the repository (IDDPM_REFERENCE_DIR overrides).
REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("IDDPM_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))

# iddpm is imported inside the functions below: conftest.py imports this module for every test, including
# those that import no iddpm module at all.

# The tiny U-Net most tests build, save, sample and evaluate: 8x8, one channel, 32 channels, one residual block,
# attention at 4x4, learned sigmas, 20 cosine-schedule steps.  Config field names (``apply_overrides``).
TINY_MODEL = dict(image_size=8, in_channels=1, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                  attention_resolutions="4", learn_sigma=True, diffusion_steps=20, noise_schedule="cosine")

# The network that the ``iddpm train`` tests train (40 steps); each test file adds its channels, batch and logging.
TINY_TRAIN_FLAGS = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
                    "--attention_resolutions", "4", "--num_heads", "2", "--diffusion_steps", "40",
                    "--noise_schedule", "cosine", "--no_progress"]


def tiny_cfg(**overrides):
    """The validated RunConfig of :data:`TINY_MODEL` with ``overrides`` (config field names)."""
    from iddpm.config import RunConfig, apply_overrides

    return apply_overrides(RunConfig(), dict(TINY_MODEL, **overrides)).validate()


def save_tiny_model(path, cfg, seed: int = 0):
    """A model file (safetensors with its config) of ``cfg`` holding :func:`random_weights` (``seed``)."""
    from iddpm.checkpoints.model_file import save_model_file

    return save_model_file(path, random_weights(cfg, seed), cfg)


def tiny_unet(**overrides):
    """A UNetModel (3 -> 6 channels, 32 wide, attention at downsample rate 2, scale-shift norm) built under seed 0,
    with the layers the original zero-initialises (output convolutions) filled from N(0, 0.05^2), so every path
    matters."""
    from iddpm.models import UNetModel

    args = dict(in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1, attention_resolutions=(2,),
                dropout=0.0, channel_mult=(1, 2), num_heads=2, use_scale_shift_norm=True)
    args.update(overrides)
    torch.manual_seed(0)
    model = UNetModel(**args)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model


def reference_json(name: str):
    """``name`` (JSON) from the reference folder, read at import time for ``parametrize``; None when absent."""
    path = REFERENCE_DIR / name
    return json.loads(path.read_text()) if path.is_file() else None


def reference_params(data, section: str, *, value=None, id=None) -> list:
    """pytest params over ``data[section]`` (a dict: its keys; a list: ``value(entry)``, default the entry), with ids
    ``id(param)`` (default str); one skipped param when the reference data are absent (``data`` is None)."""
    if data is None:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no reference data at {REFERENCE_DIR}"))]
    items = data[section]
    values = list(items) if isinstance(items, dict) else [value(e) if value else e for e in items]
    return [pytest.param(v, id=(id or str)(v)) for v in values]


def assert_same_images(a, b):
    """Equal up to the network's float32 round-off across batch shapes (~1e-6): at most +-1 on < 1% of values."""
    d = np.abs(a.astype(np.int64) - b.astype(np.int64))
    assert d.max() <= 1 and (d > 0).mean() < 0.01, (d.max(), (d > 0).mean())


def random_weights(cfg, seed: int = 0) -> dict:
    """A tiny model's state_dict whose zero-initialised layers (output convs) are filled with small random
    values, so that outputs depend on the inputs (x, t, y, low_res)."""
    from iddpm.build import build_model

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    sd = build_model(cfg).state_dict()
    return {k: torch.randn(v.shape, generator=g) * 0.1 if v.is_floating_point() and not v.any() else v
            for k, v in sd.items()}


# --- torch's process-wide settings -------------------------------------------------------------------------------
# Tests call ``main([...])`` and the API in-process, and some commands change process-wide torch state (``iddpm demo``
# and benchmarks/*.py call ``torch.set_num_threads``).  Left behind, such a change alters the float32 kernels
# (reduction order) of every later test in the same pytest(-xdist) worker, so results depend on test order.
# tests/conftest.py restores the settings captured at session start after every test.  Not covered: glibc's
# malloc tuning by iddpm.models.optimize.tune_cpu_allocator (it cannot be read back or undone, and does not
# change results) and the global RNGs (state, not settings: tests seed what they draw).

# Backend flags: (module path under torch.backends, attribute); those absent in this torch build are skipped.
_BACKEND_FLAGS = (
    ("cudnn", "enabled"), ("cudnn", "benchmark"), ("cudnn", "deterministic"), ("cudnn", "allow_tf32"),
    ("cuda.matmul", "allow_tf32"), ("cuda.matmul", "allow_fp16_reduced_precision_reduction"),
    ("cuda.matmul", "allow_bf16_reduced_precision_reduction"), ("mkldnn", "enabled"), ("opt_einsum", "enabled"),
    ("", "fp32_precision"), ("mkldnn", "fp32_precision"), ("mkldnn.matmul", "fp32_precision"),
    ("mkldnn.conv", "fp32_precision"), ("cuda.matmul", "fp32_precision"), ("cudnn.conv", "fp32_precision"),
)


def _backend(path: str):
    mod = torch.backends
    for part in filter(None, path.split(".")):
        mod = getattr(mod, part, None)
    return mod


def _flush_denormal() -> bool:
    """Whether denormals are flushed to zero (``torch.set_flush_denormal`` has no getter: probe it)."""
    return (torch.tensor([1e-39], dtype=torch.float32, device="cpu") * 2).item() == 0.0


def _settings_table():
    """(name, getter, setter) in restore order: the float32 matmul precision before the flags it also sets."""
    rows = [
        ("num_threads", torch.get_num_threads, torch.set_num_threads),
        ("num_interop_threads", torch.get_num_interop_threads, torch.set_num_interop_threads),
        ("default_dtype", torch.get_default_dtype, torch.set_default_dtype),
        ("default_device", torch.get_default_device, torch.set_default_device),
        ("grad_enabled", torch.is_grad_enabled, torch.set_grad_enabled),
        ("anomaly", lambda: (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
         lambda v: torch.set_anomaly_enabled(*v)),
        ("deterministic_algorithms",
         lambda: (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()),
         lambda v: torch.use_deterministic_algorithms(v[0], warn_only=v[1])),
        ("flush_denormal", _flush_denormal, torch.set_flush_denormal),
        ("float32_matmul_precision", torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
    ]
    for path, attr in _BACKEND_FLAGS:
        mod = _backend(path)
        if mod is not None and hasattr(mod, attr):
            rows.append((f"backends.{path + '.' if path else ''}{attr}", lambda m=mod, a=attr: getattr(m, a),
                         lambda v, m=mod, a=attr: setattr(m, a, v)))
    return rows


def torch_process_settings() -> dict:
    """torch's process-wide (and main-thread) settings that code under test may change: name -> value."""
    return {name: get() for name, get, _ in _settings_table()}


def restore_torch_process_settings(saved: dict) -> list[str]:
    """Set every setting that differs from ``saved`` back (in dependency order); returns the names restored.

    Settings that cannot be restored (the inter-op thread count once parallel work has run) raise RuntimeError
    naming the setting."""
    restored = []
    for name, get, set_ in _settings_table():
        if name in saved and get() != saved[name]:
            try:
                set_(saved[name])
            except RuntimeError as exc:
                raise RuntimeError(f"a test changed torch's {name} to {get()!r} and it cannot be set back to "
                                   f"{saved[name]!r}: {exc}") from None
            restored.append(name)
    return restored


def toy_model(x, t, y=None, low_res=None):
    """A smooth stand-in for a network (epsilon prediction shaped like x) that depends on x, t and, when given,
    the label ``y`` and the ``low_res`` input."""
    s = t.float().reshape(-1, 1, 1, 1)
    out = torch.tanh(0.7 * x + 0.3 * torch.sin(s / 100))
    if y is not None:
        out = out + 0.1 * y.float().reshape(-1, 1, 1, 1)
    if low_res is not None:
        out = out + 0.2 * torch.nn.functional.interpolate(low_res, size=x.shape[-2:], mode="nearest")
    return out
