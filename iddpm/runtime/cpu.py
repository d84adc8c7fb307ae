"""What this CPU does well: native bfloat16 or not, and the warning when ``--precision bf16`` would crawl.

On x86 a CPU computes bf16 matrix products natively only with the ``avx512_bf16`` or ``amx_bf16`` instructions
(Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later); elsewhere PyTorch converts every operand and
a bf16 matmul runs about 100x slower than in float32 (measured on an AMD EPYC without them: 1 GFLOP/s vs 169).
Detection reads the ``flags`` (x86) / ``Features`` (Arm: ``bf16``) line of ``/proc/cpuinfo``; when the flags do
not show native bf16 -- or cannot be read (macOS, Windows, an unknown architecture) -- a small bf16 and float32
matmul are timed once, and the warning quotes what was measured.  A CPU whose flags show native bf16 is trusted
without timing.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch

__all__ = ["BF16_FLAGS", "cpu_flags", "native_bf16", "matmul_gflops", "slow_bf16_message", "warn_if_slow_bf16"]

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = {"x86": ("avx512_bf16", "amx_bf16"), "arm": ("bf16",)}
_X86 = ("x86_64", "amd64", "i386", "i686")
_ARM = ("aarch64", "arm64")
SLOW_RATIO = 4.0  # bf16 this many times slower than fp32 is "slow" (native bf16 is faster than fp32)


def _arch(machine: str | None = None) -> str:
    m = (machine if machine is not None else platform.machine()).lower()
    return "x86" if m in _X86 else "arm" if m in _ARM else ""


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str] | None:
    """The feature flags of the first CPU in ``/proc/cpuinfo`` (or the given text); None when unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return None


def native_bf16(cpuinfo: str | None = None, machine: str | None = None) -> bool | None:
    """True / False when the CPU flags show / do not show native bf16 matmuls; None when they cannot tell."""
    arch, flags = _arch(machine), cpu_flags(cpuinfo)
    if not arch or flags is None:
        return None
    return any(f in flags for f in BF16_FLAGS[arch])


def matmul_gflops(dtype: torch.dtype, n: int = 256, reps: int = 3) -> float:
    """Best single-thread throughput of an ``n x n`` CPU matmul in ``dtype`` over ``reps`` runs, GFLOP/s.

    One thread: the ratio of two kernels is what is wanted, and on a busy machine several OpenMP threads fighting
    for cores made a 256^3 float32 product 50x slower (20 ms vs 0.35 ms) while bf16 went through unharmed.
    n = 256 is 34 MFLOP: ~0.03 s per run at the 1 GFLOP/s of emulated bf16, well under a millisecond natively.
    The thread count is restored afterwards.
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.mm(a, b)  # warm-up: kernel selection, first-touch of the output
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return 2 * n**3 / max(best, 1e-9) / 1e9


def slow_bf16_message(cpuinfo: str | None = None, machine: str | None = None,
                      measure: Callable[[torch.dtype], float] | None = None) -> str | None:
    """The one-line warning for ``--precision bf16`` on this CPU, or None when bf16 is fine here.

    Flags showing native bf16: None without timing.  Otherwise ``measure`` (GFLOP/s of a matmul in a dtype;
    default :func:`matmul_gflops`) is run for float32 and bf16; the message is given when bf16 is
    :data:`SLOW_RATIO` or more times slower.
    """
    native = native_bf16(cpuinfo, machine)
    if native:
        return None
    measure = measure or matmul_gflops
    fp32, bf16 = measure(torch.float32), measure(torch.bfloat16)
    if bf16 * SLOW_RATIO > fp32:
        return None
    arch = _arch(machine)
    if native is False:
        why = f"no {' / '.join(BF16_FLAGS[arch])} in {CPUINFO}"
    else:
        why = "its flags could not be read"
    return (f"--precision bf16: this CPU has no native bfloat16 ({why}): a bf16 matmul ran at {bf16:.1f} GFLOP/s "
            f"vs {fp32:.0f} in float32 ({fp32 / max(bf16, 1e-9):.0f}x slower); use --precision fp32 on this CPU")


def warn_if_slow_bf16(mode: str, device: torch.device | str, *, stream: TextIO | None = None,
                      message: Callable[[], str | None] | None = None) -> str | None:
    """Print one ``iddpm: warning:`` line to ``stream`` (default stderr) when bf16 is asked for on a CPU that runs it
    slowly; returns the message (None: nothing to say).  Called once per training run (by the precision policy)."""
    if mode != "bf16" or torch.device(device).type != "cpu":
        return None
    text = (message or slow_bf16_message)()
    if text:
        print(f"iddpm: warning: {text}", file=stream or sys.stderr, flush=True)
    return text
