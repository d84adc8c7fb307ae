"""Speed part of ``benchmarks/gpu_check.py``: training img/s and sampling img-steps/s of the presets on one device,
five ways of running them interleaved step by step, with FLOPs, MFU and peak memory.

Reuses ``benchmarks/speed.py`` (FLOP counting through ``torch.utils.flop_counter``, the train / sample step,
the bf16-autocast wrapper, the matmul-peak probe, the rate summary).  Variants:

* ``fp32``: the plain model (NCHW, eager) with IEEE float32 matmuls and convolutions (TF32 off);
* ``tf32``: the same with TF32 tensor cores for matmuls and convolutions;
* ``bf16``: the plain model under bf16 autocast (what ``--precision bf16 --fast False`` runs);
* ``bf16+compile``: ``torch.compile`` of the plain model (NCHW) under bf16 autocast;
* ``bf16+compile+cl``: ``optimize(model, mode)`` on CUDA = channels_last + ``torch.compile``, under bf16 autocast
  (what ``iddpm train --precision bf16`` runs by default).

A step is timed between two device synchronisations; each figure is the median of ``reps`` rounds after
``warmup`` rounds, and every round runs each variant once, so drift hits all alike.
"""

from __future__ import annotations

import copy
import re
import time

import speed
import torch
from gpu_check_lib import SMOKE, fp32_math, is_cuda, small_config, synchronize
from torch import nn

from iddpm.build import build_diffusion, build_model
from iddpm.config import preset
from iddpm.models import optimize

VARIANTS = ("fp32", "tf32", "bf16", "bf16+compile", "bf16+compile+cl")
# (train, sample) batch per preset for a ~140 GB GPU (H200); scaled down with the GPU's memory.  The fp32 eager
# variant holds the most activations: about 0.3 GB per 32x32 image for cifar10_uncond and 1.5 GB per 64x64 image
# for imagenet64_cond (saved-tensor bytes of one forward), next to five copies of weights + AdamW state.
BATCH = {"cifar-small": (512, 1024), "cifar10_uncond": (256, 512), "imagenet64_cond": (32, 64), "small": (2, 2)}
REFERENCE_MEMORY_GB = 140.0

# Dense peak TFLOP/s per device (bf16 tensor, TF32 tensor, fp32 non-tensor), from NVIDIA's datasheets (H100/H200:
# "NVIDIA H100 Tensor Core GPU" and "NVIDIA H200 Tensor Core GPU" datasheets; A100, L40S, L4, A10 datasheets; RTX
# 4090: Ada architecture whitepaper).  The datasheets quote tensor-core figures "with sparsity"; dense is half.
# More specific names come first (H100 NVL/PCIe before H100 = SXM).  MIG slices and other devices: no MFU.
PEAKS = [
    (r"H200 NVL", "H200 NVL", 835.5, 417.5, 60.0),
    (r"H200", "H200 SXM", 989.5, 494.5, 67.0),
    (r"H100 NVL", "H100 NVL", 835.5, 417.5, 60.0),
    (r"H100 PCIe", "H100 PCIe", 756.5, 378.0, 51.0),
    (r"H100", "H100 SXM", 989.5, 494.5, 67.0),
    (r"A100", "A100", 312.0, 156.0, 19.5),
    (r"L40S", "L40S", 362.0, 183.0, 91.6),
    (r"\bL4\b", "L4", 121.0, 60.0, 30.3),
    (r"\bA10\b", "A10", 125.0, 62.5, 31.2),
    (r"RTX 4090", "RTX 4090", 165.2, 82.6, 82.6),
]


def device_peaks(name: str) -> dict | None:
    """``{"label", "bf16", "tf32", "fp32"}`` in TFLOP/s for a CUDA device name, or None (unknown, MIG)."""
    if "MIG" in name:
        return None
    for pattern, label, bf16, tf32, fp32 in PEAKS:
        if re.search(pattern, name):
            return {"label": label, "bf16": bf16, "tf32": tf32, "fp32": fp32}
    return None


def config_for(name: str):
    """The RunConfig of a preset, or of ``"small"``: the smoke run's tiny U-Net (gpu_check_lib.SMOKE)."""
    return small_config(**SMOKE) if name == "small" else preset(name)


def peak_kind(variant: str) -> str:
    return "bf16" if variant.startswith("bf16") else variant


def scaled_batch(name: str, mode: str, device, scale: float = 1.0) -> int:
    """The preset's batch for this device: :data:`BATCH` scaled by GPU memory / 140 GB, a power of two, >= 1."""
    base = BATCH.get(name, (16, 32))[0 if mode == "train" else 1]
    if is_cuda(device):
        mem_gb = torch.cuda.get_device_properties(torch.device(device)).total_memory / 1e9
        scale *= min(1.0, mem_gb / REFERENCE_MEMORY_GB)
    b = max(1, int(base * scale))
    return 1 << (b.bit_length() - 1)


class SpeedVariant:
    """One way of running the model, on its own copy; duck-types ``speed.Variant`` for ``speed.train_step``."""

    def __init__(self, name: str, base: nn.Module, mode: str, device, lr: float, wd: float, compile_backend: str):
        self.name = name
        self.tf32 = name == "tf32"
        model = copy.deepcopy(base)
        ck = {"backend": compile_backend}
        dev = torch.device(device).type
        if name in ("fp32", "tf32"):
            module = model
        elif name == "bf16":
            module = speed._Bf16Forward(model, dev)
        elif name == "bf16+compile":
            module = speed._Bf16Forward(torch.compile(model, dynamic=False, **ck), dev)
        elif name == "bf16+compile+cl":
            module = speed._Bf16Forward(optimize(model, mode, compile=True, compile_kwargs=ck), dev)
        else:
            raise ValueError(f"unknown variant {name!r} (choose from {', '.join(VARIANTS)})")
        model.train(mode == "train")
        self.model, self.module = model, module
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd) if mode == "train" else None
        self.first_call_s: float | None = None
        self.peak_bytes = 0

    def resident_bytes(self) -> int:
        """Bytes this variant keeps between steps: weights, gradients, optimizer state."""
        tensors = list(self.model.parameters()) + [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.opt is not None:
            tensors += [v for st in self.opt.state.values() for v in st.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)


def timed_step(v: SpeedVariant, step, args, device, track_memory: bool) -> float:
    """Seconds of one step between device synchronisations; records the variant's peak memory (as if it ran alone:
    the peak minus what the other variants hold)."""
    with fp32_math("tf32" if v.tf32 else "ieee"):
        synchronize(device)
        if track_memory and is_cuda(device):
            others = torch.cuda.memory_allocated(device) - v.resident_bytes()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        step(v, *args)
        synchronize(device)
        dt = time.perf_counter() - t0
        if track_memory and is_cuda(device):
            v.peak_bytes = max(v.peak_bytes, torch.cuda.max_memory_allocated(device) - others)
    return dt


def _inputs(cfg, batch: int, device, gen: torch.Generator, diffusion, mode: str):
    m = cfg.model
    x = torch.randn(batch, m.in_channels, m.image_size, m.image_size, generator=gen).clamp(-1, 1).to(device)
    kw = {"y": torch.randint(0, m.num_classes, (batch,), generator=gen).to(device)} if m.class_cond else {}
    if mode == "train":
        t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=gen).to(device)
    else:
        t = torch.full((batch,), diffusion.num_timesteps // 2, dtype=torch.long, device=device)
    return x, kw, t


def flops_per_image(model, diffusion, cfg, device, mode: str) -> tuple[float, float]:
    """(forward FLOPs, whole-step FLOPs) per image, counted at batch 2 (FLOPs are linear in the batch)."""
    gen = torch.Generator().manual_seed(1)
    x, kw, t = _inputs(cfg, 2, device, gen, diffusion, mode)
    with fp32_math("ieee"):
        fwd, step = speed.step_flops(model, diffusion, x, kw, t, mode)
    return fwd / 2, step / 2


def bench_section(name: str, mode: str, batch: int, variants, device, reps: int, warmup: int,
                  compile_backend: str, time_left) -> list[dict]:
    """Rows of one (preset, mode, batch): every variant of ``variants`` interleaved in ``warmup + reps`` rounds.
    ``time_left()``: seconds of budget left; a compiled variant is not started with less than 60 s left."""
    torch.manual_seed(0)
    cfg = config_for(name)
    model = build_model(cfg).to(device)
    diffusion = build_diffusion(cfg.diffusion)
    fwd_img, step_img = flops_per_image(model, diffusion, cfg, device, mode)
    x, kw, t = _inputs(cfg, batch, device, torch.Generator().manual_seed(0), diffusion, mode)
    step = speed.train_step if mode == "train" else speed.sample_step
    args = (diffusion, x, kw, t)
    torch._dynamo.reset()  # earlier sections' compiled code must not count towards recompile limits
    rows, built = [], []
    for vn in variants:
        row = dict(preset=name, mode=mode, variant=vn, batch=batch, unit="img/s" if mode == "train" else "img-steps/s",
                   fwd_gflop_per_img=fwd_img / 1e9, step_tflop=step_img * batch / 1e12)
        if vn == "tf32" and not is_cuda(device):
            rows.append({**row, "status": "skipped: no CUDA"})
            continue
        if "compile" in vn and time_left() < 60:
            rows.append({**row, "status": "skipped: time budget"})
            continue
        try:
            v = SpeedVariant(vn, model, mode, device, cfg.train.lr, cfg.train.weight_decay, compile_backend)
            v.first_call_s = timed_step(v, step, args, device, track_memory=True)  # compiles the compiled ones
            built.append((v, row))
        except Exception as exc:  # OOM at this batch, a compiler failure: reported in the row, the rest goes on
            rows.append({**row, "status": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"})
            if is_cuda(device):
                torch.cuda.empty_cache()
    times: dict[str, list[float]] = {v.name: [] for v, _ in built}
    for i in range(warmup + reps):
        for v, row in list(built):
            try:
                dt = timed_step(v, step, args, device, track_memory=i < warmup)
            except Exception as exc:  # e.g. OOM once another variant holds more memory: drop this one
                rows.append({**row, "status": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"})
                built.remove((v, row))
                continue
            if i >= warmup:
                times[v.name].append(dt)
    for v, row in built:
        s = speed.summarize(times[v.name], batch) if times[v.name] else None
        if s is None:
            rows.append({**row, "status": "no timed steps"})
            continue
        rows.append({**row, **s, "status": "ok", "first_call_s": v.first_call_s,
                     "achieved_tflops": step_img * batch / s["median_step_s"] / 1e12,
                     "peak_mem_gib": v.peak_bytes / 2**30 if is_cuda(device) else None})
    del built
    if is_cuda(device):
        torch.cuda.empty_cache()
    return rows


def add_mfu(rows: list[dict], peaks: dict | None) -> None:
    """MFU of each measured row against its math mode's dense peak (bf16 rows: bf16; tf32: TF32; fp32: fp32)."""
    for r in rows:
        if r.get("status") == "ok" and peaks:
            r["peak_tflops"] = peaks[peak_kind(r["variant"])]
            r["mfu"] = r["achieved_tflops"] / r["peak_tflops"]


def measured_peaks(device) -> dict[str, float]:
    """bf16 and TF32 ``torch.mm`` throughput measured now (TFLOP/s; an 8192^3 product saturates big GPUs)."""
    out = {}
    n = 8192 if is_cuda(device) else 1024
    out["bf16_mm"] = speed.measure_matmul_peak(n, 5, torch.bfloat16, device) / 1e3
    with fp32_math("tf32"):
        out["tf32_mm"] = speed.measure_matmul_peak(n, 5, torch.float32, device) / 1e3
    return out


# ------------------------------------------------------------------------------------------------
# the plan (sections in priority order: what the targets need first) and the targets
# ------------------------------------------------------------------------------------------------
# (preset, mode, batch multiplier, variants).  The second cifar10_uncond training entry is the batch sweep of the
# library's default CUDA path for the MFU target ("at its best batch size").
FULL_PLAN = [("cifar10_uncond", "train", 1.0, VARIANTS), ("imagenet64_cond", "train", 1.0, VARIANTS),
             ("cifar10_uncond", "sample", 1.0, VARIANTS), ("cifar10_uncond", "train", 2.0, ("bf16+compile+cl",)),
             ("imagenet64_cond", "sample", 1.0, VARIANTS), ("cifar-small", "train", 1.0, VARIANTS),
             ("cifar-small", "sample", 1.0, VARIANTS)]
QUICK_PLAN = [("cifar10_uncond", "train", 1.0, VARIANTS), ("cifar10_uncond", "sample", 1.0, VARIANTS)]
SMOKE_PLAN = [("small", "train", 1.0, VARIANTS), ("small", "sample", 1.0, VARIANTS)]
TARGET_SPEEDUP = 2.0  # bf16 + compile training vs the fp32 eager step
TARGET_MFU = 0.40  # of the dense bf16 peak, at the best batch size


def run_plan(plan, device, reps: int, warmup: int, compile_backend: str, time_left, log=print) -> list[dict]:
    """Every section of ``plan`` that the budget allows (a section needs 30 s left to start)."""
    rows: list[dict] = []
    for name, mode, mult, variants in plan:
        batch = scaled_batch(name, mode, device, mult)
        if time_left() < 30:
            rows += [dict(preset=name, mode=mode, variant=v, batch=batch, status="skipped: time budget")
                     for v in variants]
            log(f"speed {name} {mode} b={batch}: skipped (time budget)")
            continue
        t0 = time.perf_counter()
        try:
            section = bench_section(name, mode, batch, variants, device, reps, warmup, compile_backend, time_left)
        except Exception as exc:  # building the preset, counting FLOPs: the other sections still run
            why = f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
            section = [dict(preset=name, mode=mode, variant=v, batch=batch, status=why) for v in variants]
        rows += section
        for r in section:
            what = f"{r['median']:.1f} {r['unit']}" if r.get("status") == "ok" else r.get("status")
            log(f"speed {name} {mode} {r['variant']} b={batch}: {what}")
        log(f"speed {name} {mode} b={batch}: section took {time.perf_counter() - t0:.0f} s")
    return rows


def targets(rows: list[dict], preset_name: str, peaks: dict | None) -> list[dict]:
    """The issue's two speed targets, computed from the measured rows of ``preset_name`` training."""
    ok = [r for r in rows if r.get("status") == "ok" and r["preset"] == preset_name and r["mode"] == "train"]
    fp32 = [r for r in ok if r["variant"] == "fp32"]
    out = []
    compiled = [r for r in ok if r["variant"].startswith("bf16+compile") and fp32 and r["batch"] == fp32[0]["batch"]]
    name = f"{preset_name} train: bf16 + compile vs fp32 eager"
    if fp32 and compiled:
        best = max(compiled, key=lambda r: r["median"])
        ratio = best["median"] / fp32[0]["median"]
        out.append(dict(target=name, measured=f"{ratio:.2f}x ({best['variant']}, batch {best['batch']})",
                        goal=f">= {TARGET_SPEEDUP:g}x", status="met" if ratio >= TARGET_SPEEDUP else "missed",
                        value=ratio))
    else:
        out.append(dict(target=name, measured="not measured", goal=f">= {TARGET_SPEEDUP:g}x", status="n/a"))
    name = f"{preset_name} train: MFU of bf16 + compile (best batch)"
    goal = f">= {100 * TARGET_MFU:.0f}% of dense bf16 peak"
    with_mfu = [r for r in ok if r["variant"].startswith("bf16+compile") and "mfu" in r]
    if with_mfu:
        best = max(with_mfu, key=lambda r: r["mfu"])
        out.append(dict(target=name, measured=f"{100 * best['mfu']:.1f}% ({best['variant']}, batch {best['batch']}, "
                        f"{best['achieved_tflops']:.0f} of {best['peak_tflops']:.0f} TFLOP/s)", goal=goal,
                        status="met" if best["mfu"] >= TARGET_MFU else "missed", value=best["mfu"]))
    else:
        why = "not measured" if peaks else "no dense peak known for this device (MFU omitted)"
        out.append(dict(target=name, measured=why, goal=goal, status="n/a"))
    return out
