"""Precision policy: fp32, bf16 autocast, or fp16 autocast with dynamic loss scaling (torch.amp).

fp16 follows the original's ``use_fp16`` semantics with ``torch.amp.GradScaler``: the loss is
multiplied by the scale (initially 2**20, the original's ``lg_loss_scale = 20``); a step whose
gradients overflow is skipped and the scale halves; after ``1 / fp16_scale_growth`` clean steps it
doubles (the original grows ``lg_loss_scale`` by ``fp16_scale_growth`` every step: the same average
rate, in whole doublings).  Parameters, optimizer state and EMA stay float32 ("master weights").
"""

from __future__ import annotations

import contextlib

import torch

from iddpm.config import ConfigError
from iddpm.runtime.cpu import warn_if_slow_bf16

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast context + optional GradScaler for one device."""

    def __init__(self, mode: str, device: torch.device, fp16_scale_growth: float = 1e-3) -> None:
        if mode not in _DTYPES:
            raise ConfigError(f"--precision {mode!r}: choose fp32, bf16 or fp16")
        if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("--precision bf16: this GPU has no bfloat16 support; use --precision fp16")
        warn_if_slow_bf16(mode, device)  # a CPU without native bf16 runs it ~100x slower: say so, once per run
        self.mode = mode
        self.device = device
        self.dtype = _DTYPES[mode]
        interval = max(1, round(1.0 / fp16_scale_growth)) if fp16_scale_growth > 0 else 10**9
        self.scaler = torch.amp.GradScaler(
            device.type, init_scale=2.0**20, growth_factor=2.0, backoff_factor=0.5,
            growth_interval=interval, enabled=(mode == "fp16"),
        )

    @property
    def scaling(self) -> bool:
        return self.mode == "fp16"

    def autocast(self):
        """Context manager for the forward pass (a no-op for fp32)."""
        if self.mode == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaling else loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaling:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Optimizer step (through the scaler under fp16).  Returns False when the step was skipped."""
        if not self.scaling:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return not self.scaler.get_scale() < before

    def loss_scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaling else 1.0

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaling else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaling and state:
            self.scaler.load_state_dict(state)
