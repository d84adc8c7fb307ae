"""``optimize(model, mode)``: the fast path used by ``iddpm train`` and ``iddpm sample``.

The returned module takes ordinary NCHW float32 inputs and returns NCHW outputs with the same
values as ``model`` (within float32 round-off), but internally

* runs channels_last end to end (oneDNN convolutions, channels-last GroupNorm / upsampling, attention
  on a free ``[B, L, C]`` view) -- the parameters of ``model`` are converted **in place**
  (``model.to(memory_format=torch.channels_last)``; values and state_dict keys are unchanged);
* uses the cheaper CPU dropout of :func:`iddpm.models.layers.dropout` in the residual blocks (same
  distribution as ``nn.Dropout``, different random stream; the blocks' ``fast`` flag, set in place);
* on CPU under glibc, stops ``malloc`` from returning large blocks to the OS (:func:`tune_cpu_allocator`):
  otherwise every activation of 32 MiB or more is a fresh ``mmap`` whose pages the kernel faults in and
  zeroes on every forward pass (4-8% of the CPU time of a batch-64 cifar-small sampling step);
* optionally runs under ``torch.compile`` (``compile=None``: only on CUDA; ``True`` / ``False`` force it).

The wrapper shares its parameters with ``model`` (optimizers/EMA may use either); its
``state_dict()`` / ``load_state_dict()`` are the model's (no ``model.`` prefix), and attributes it
lacks (``num_classes``, ``in_channels``, ...) are looked up on the model.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

import torch
from torch import nn

from iddpm.models.blocks import ResBlock
from iddpm.models.layers import channels_last_format

__all__ = ["optimize", "OptimizedUNet", "tune_cpu_allocator"]

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_MAX = -4

_MODES = ("train", "sample")


def _to_memory_format(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or not isinstance(t, torch.Tensor):
        return t
    fmt = channels_last_format(t.dim())
    return t if fmt is None else t.contiguous(memory_format=fmt)


class OptimizedUNet(nn.Module):
    """Wrapper returned by :func:`optimize`.  ``forward(x, timesteps, **kwargs)`` like the wrapped model."""

    def __init__(self, model: nn.Module, mode: str, compiled: bool, compile_kwargs: dict[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.mode = mode
        self.compiled = compiled
        # Static shapes by default: a run uses one or two batch shapes, and dynamic-shape kernels for
        # channels_last convolutions are slower (and have failed to lower in inductor on CPU).
        kwargs = {"dynamic": False, **(compile_kwargs or {})}
        runner = torch.compile(model, **kwargs) if compiled else model
        # Kept outside the module registry so state_dict / parameters are not duplicated.
        object.__setattr__(self, "_runner", runner)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        x = _to_memory_format(x)
        if "low_res" in kwargs:
            kwargs["low_res"] = _to_memory_format(kwargs["low_res"])
        out = self._runner(x, timesteps, **kwargs)
        return out.contiguous()

    def state_dict(self, *args: Any, **kwargs: Any):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self._modules.get("model")
            if model is None:
                raise
            return getattr(model, name)


def tune_cpu_allocator() -> bool:
    """Keep freed heap memory for reuse instead of handing large blocks back to the OS (glibc only).

    Sets ``mallopt(M_MMAP_MAX, 0)`` (large blocks come from the heap, not from ``mmap``) and
    ``mallopt(M_TRIM_THRESHOLD, 1 GiB)`` (free memory at the top of the heap is kept).  Effect: the
    same-sized activations of consecutive forward/backward passes reuse memory instead of being
    page-faulted and zeroed by the kernel each time; the cost is that the process keeps its peak
    heap size.  Process-wide and idempotent.  Returns True when applied, False on non-glibc systems.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 -- raises AttributeError unless this is glibc
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def optimize(
    model: nn.Module,
    mode: str = "train",
    *,
    compile: bool | None = None,
    compile_kwargs: dict[str, Any] | None = None,
    tune_allocator: bool | None = None,
) -> OptimizedUNet:
    """The fast version of ``model`` for training (``mode="train"``) or sampling (``mode="sample"``).

    Converts ``model``'s 4D/5D parameters to channels_last **in place** and returns an
    :class:`OptimizedUNet` that accepts NCHW float32 tensors and returns contiguous NCHW outputs.
    ``compile``: wrap the model in ``torch.compile`` (default None = only when the model lives on CUDA,
    where compilation reliably pays off; on CPU it costs a long first call and needs a C++ compiler).
    ``tune_allocator``: call :func:`tune_cpu_allocator` (default None = when the model lives on the CPU).
    The residual blocks' ``fast`` flag is set (cheaper CPU dropout; see the module docstring).
    Idempotent: optimizing an :class:`OptimizedUNet` re-wraps its inner model.
    """
    if mode not in _MODES:
        raise ValueError(f"optimize(mode={mode!r}): choose 'train' or 'sample'")
    if isinstance(model, OptimizedUNet):
        model = model.model
    dims = getattr(model, "dims", 2)
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}.get(dims)
    if fmt is not None:
        model.to(memory_format=fmt)
    for module in model.modules():
        if isinstance(module, ResBlock):
            module.fast = True
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    if tune_allocator is None:
        tune_allocator = device.type == "cpu"
    if tune_allocator:
        tune_cpu_allocator()
    if compile is None:
        compile = device.type == "cuda"
    if compile and not hasattr(torch, "compile"):
        compile = False
    return OptimizedUNet(model, mode, bool(compile), compile_kwargs)
