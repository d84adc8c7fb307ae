"""Training and sampling speed of the U-Net presets, with FLOPs and the fraction of the fp32 matmul peak.

Usage::

    python benchmarks/speed.py                  # digits + cifar-small + cifar10_uncond, all variants
    python benchmarks/speed.py --presets cifar-small --variants eager,fast --reps 9

Writes ``benchmarks/results/speed/speed.md`` and ``speed.json`` (``--out`` to change; ``--out ''`` = don't).

What is measured (all in one process; the variants are interleaved step by step so that machine
noise hits all alike):

* training: ``training_losses`` (the preset's loss; forward inside) + backward + AdamW step, img/s;
* sampling: one ancestral ``p_sample`` step (network forward under ``torch.no_grad`` + update), img-steps/s;
* FLOPs from ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts 2): the forward, and
  for training the whole forward + backward as counted (about 3x the forward);
* the machine's fp32 matmul peak, measured in the same run at the same thread count (best of
  several 2048^3 ``torch.mm``, at the start and at the end; MFU uses the larger);
  MFU = achieved GFLOP/s (counted FLOPs / median step time) / peak.

Variants (``--variants``):

* ``eager``: the plain model, fp32, NCHW (what ``--fast false`` runs);
* ``fast``: ``iddpm.models.optimize(model, mode)`` -- what ``iddpm train`` / ``iddpm sample`` use by default;
* ``compile``: ``optimize(..., compile=True)`` (``torch.compile``, inductor); its first call (compilation)
  is reported separately and not timed;
* ``bf16``: ``fast`` with the network forward under ``torch.autocast("cpu", torch.bfloat16)`` (output cast
  back to float32, diffusion maths in float32);
* ``fast+fusedadam``: ``fast`` with ``AdamW(fused=True)`` (training only; the default trainer uses plain AdamW).

Each figure is the median of ``--reps`` timed steps after ``--warmup`` untimed ones, with min and max.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from iddpm.build import build_diffusion, build_model
from iddpm.config import preset
from iddpm.models import optimize

DEFAULT_BATCH = {"digits": (128, 256), "cifar-small": (32, 64), "cifar10_uncond": (8, 16)}
VARIANTS = ("eager", "fast", "compile", "bf16", "fast+fusedadam")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "speed"


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(n: int = 2048, reps: int = 7, dtype: torch.dtype = torch.float32, device="cpu") -> float:
    """Best ``torch.mm`` throughput in GFLOP/s over ``reps`` runs of an n^3 product in ``dtype`` on ``device``
    (CUDA: synchronised around each product; benchmarks/gpu_check.py uses it with a larger n)."""
    a = torch.randn(n, n).to(device=device, dtype=dtype)
    b = torch.randn(n, n).to(device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def count_flops(fn) -> int:
    """FLOPs of ``fn()`` as counted by ``FlopCounterMode`` (forward and, if it runs one, backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def step_flops(model: nn.Module, diffusion, x, kw, t, mode: str) -> tuple[int, int]:
    """(forward FLOPs, FLOPs of the whole step: the forward for sampling, forward + backward for training)."""
    with torch.no_grad():
        fwd = count_flops(lambda: model(x, t.float(), **kw))
    if mode != "train":
        return fwd, fwd
    probe = copy.deepcopy(model)
    return fwd, count_flops(lambda: diffusion.training_losses(probe, x, t, model_kwargs=kw)["loss"].mean().backward())


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


class _Bf16Forward(nn.Module):
    """Runs the wrapped module under bf16 autocast (CPU unless ``device_type`` says otherwise) and returns float32."""

    def __init__(self, module: nn.Module, device_type: str = "cpu"):
        super().__init__()
        self.inner = module
        self.device_type = device_type

    def forward(self, x, timesteps, **kwargs):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self.inner(x, timesteps, **kwargs)
        return out.float()


class Variant:
    """One way of running the model, on its own deep copy (so layouts and optimizer states are not shared)."""

    def __init__(self, name: str, base_model: nn.Module, mode: str, lr: float, weight_decay: float):
        self.name = name
        model = copy.deepcopy(base_model)
        if name == "eager":
            module = model
        elif name in ("fast", "bf16", "fast+fusedadam"):
            module = optimize(model, mode=mode)
        elif name == "compile":
            module = optimize(model, mode=mode, compile=True)
        else:
            raise ValueError(f"unknown variant {name!r} (choose from {', '.join(VARIANTS)})")
        self.module = _Bf16Forward(module) if name == "bf16" else module
        self.module.train(mode == "train")
        self.model = model
        self.opt = None
        if mode == "train":
            self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                         fused=name == "fast+fusedadam")
        self.first_call_s: float | None = None


def train_step(v: Variant, diffusion, x, kwargs, t) -> None:
    losses = diffusion.training_losses(v.module, x, t, model_kwargs=kwargs)
    loss = losses["loss"].mean()
    v.opt.zero_grad(set_to_none=True)
    loss.backward()
    v.opt.step()


def sample_step(v: Variant, diffusion, x, kwargs, t) -> None:
    with torch.no_grad():
        diffusion.p_sample(v.module, x, t, model_kwargs=kwargs)


def summarize(times: list[float], batch: int) -> dict:
    rates = sorted(batch / s for s in times)
    return {"median": statistics.median(rates), "min": rates[0], "max": rates[-1], "n": len(rates),
            "median_step_s": statistics.median(times)}


def bench_preset(name: str, variants: list[str], reps: int, warmup: int, train_batch: int, sample_batch: int,
                 modes: list[str]) -> list[dict]:
    torch.manual_seed(0)
    cfg = preset(name)
    model = build_model(cfg)
    diffusion = build_diffusion(cfg.diffusion)
    m = cfg.model
    shape = (m.in_channels, m.image_size, m.image_size)
    gen = torch.Generator().manual_seed(0)

    def kwargs_for(batch):
        kw = {}
        if m.class_cond:
            kw["y"] = torch.randint(0, m.num_classes, (batch,), generator=gen)
        if m.super_res:
            kw["low_res"] = torch.randn(batch, m.in_channels, m.small_size, m.small_size, generator=gen)
        return kw

    rows = []
    for mode in modes:
        batch = train_batch if mode == "train" else sample_batch
        x = torch.randn(batch, *shape, generator=gen).clamp(-1, 1)
        kw = kwargs_for(batch)
        t_train = torch.randint(0, diffusion.num_timesteps, (batch,), generator=gen)
        t_sample = torch.full((batch,), diffusion.num_timesteps // 2, dtype=torch.long)
        step = train_step if mode == "train" else sample_step
        t = t_train if mode == "train" else t_sample
        model.train(mode == "train")
        flops_fwd, flops_step = step_flops(model, diffusion, x, kw, t, mode)
        if hasattr(torch, "_dynamo"):
            torch._dynamo.reset()  # compiled code of earlier presets/modes must not count towards recompile limits
        built: list[Variant] = []
        for vn in variants:
            if vn == "fast+fusedadam" and mode != "train":
                continue
            try:
                v = Variant(vn, model, mode, cfg.train.lr, cfg.train.weight_decay)
                t0 = time.perf_counter()
                step(v, diffusion, x, kw, t)  # first call: compilation for "compile"
                v.first_call_s = time.perf_counter() - t0
                built.append(v)
            except Exception as exc:  # e.g. no C++ compiler for inductor
                print(f"  {name} {mode} {vn}: skipped ({type(exc).__name__}: {str(exc)[:200]})", file=sys.stderr)
        times: dict[str, list[float]] = {v.name: [] for v in built}
        for i in range(warmup + reps):
            for v in list(built):
                try:
                    t0 = time.perf_counter()
                    step(v, diffusion, x, kw, t)
                    dt = time.perf_counter() - t0
                except Exception as exc:
                    print(f"  {name} {mode} {v.name}: failed ({type(exc).__name__}: {str(exc)[:200]})",
                          file=sys.stderr)
                    times.pop(v.name, None)
                    built.remove(v)
                    continue
                if i >= warmup:
                    times[v.name].append(dt)
        for v in built:
            ts = times.get(v.name)
            if not ts:
                continue
            s = summarize(ts, batch)
            gflops = flops_step / s["median_step_s"] / 1e9
            rows.append(dict(preset=name, mode=mode, variant=v.name, batch=batch,
                             unit="img/s" if mode == "train" else "img-steps/s", **s,
                             first_call_s=v.first_call_s, fwd_gflop_per_img=flops_fwd / batch / 1e9,
                             step_gflop=flops_step / 1e9, achieved_gflops=gflops))
            print(f"  {name:15s} {mode:6s} {v.name:15s} b={batch:<4d} median {s['median']:8.2f} "
                  f"(min {s['min']:.2f}, max {s['max']:.2f}) {rows[-1]['unit']:12s} {gflops:6.1f} GFLOP/s "
                  f"first call {v.first_call_s:.1f} s", flush=True)
        del built
    return rows


def mfu_text(row: dict, peak: float, peak_bf16: float) -> str:
    text = f"{100 * row['achieved_gflops'] / peak:.1f}%"
    if row["variant"] == "bf16":
        text += f" of fp32, {100 * row['achieved_gflops'] / peak_bf16:.1f}% of bf16"
    return text


def markdown(meta: dict, rows: list[dict]) -> str:
    peak = meta["peak_gflops"]
    la0, la1 = meta["loadavg_start"], meta["loadavg_end"]
    lines = [
        f"Measured {meta['date']} on {meta['cpu']} ({meta['cpu_count']} logical CPUs), torch {meta['torch']}, "
        f"{meta['threads']} threads.",
        f"Load average (1/5/15 min) at start {la0}, at end {la1}.",
        f"fp32 matmul peak in this run (2048^3 torch.mm, {meta['threads']} threads): start "
        f"{meta['peak_gflops_start']:.0f}, end {meta['peak_gflops_end']:.0f} GFLOP/s; MFU below uses "
        f"{peak:.0f}. bf16 matmul peak (end of run): {meta['peak_gflops_bf16']:.0f} GFLOP/s "
        "(the bf16 rows' MFU is given against both).",
        f"Command: `{meta['command']}`",
        "",
        "| preset | mode | variant | batch | median | min-max | unit | GFLOP/img fwd | GFLOP/s | MFU | first call s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['mode']} | {r['variant']} | {r['batch']} | {r['median']:.1f} | "
            f"{r['min']:.1f}-{r['max']:.1f} | {r['unit']} | {r['fwd_gflop_per_img']:.3f} | "
            f"{r['achieved_gflops']:.1f} | {mfu_text(r, peak, meta['peak_gflops_bf16'])} | {r['first_call_s']:.1f} |")
    lines += ["", "Training = training_losses (forward inside) + backward + AdamW step; sampling = one p_sample step "
              "(forward + update). GFLOP/s = FlopCounterMode FLOPs of the step / median step time. "
              "eager = plain fp32 NCHW model; fast = iddpm.models.optimize() (the default of iddpm train/sample); "
              "compile = optimize(compile=True) (first call = compilation, not timed); bf16 = fast under CPU bf16 "
              "autocast (not fp32 numerics); fast+fusedadam = fast with AdamW(fused=True). The allocator setting "
              "of optimize() is process-wide, so once any optimized variant is built the eager one benefits "
              "from it too."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="digits,cifar-small,cifar10_uncond")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--modes", default="train,sample")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--train_batch", type=int, default=0, help="0 = per-preset default")
    p.add_argument("--sample_batch", type=int, default=0, help="0 = per-preset default")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for speed.md + speed.json ('' = don't write)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "loadavg_start": load_average(),
            "command": "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    meta["peak_gflops_start"] = measure_matmul_peak()
    print(f"{meta['cpu']}, {meta['cpu_count']} cpus, torch {meta['torch']}, {meta['threads']} threads, "
          f"load {meta['loadavg_start']}; fp32 matmul peak {meta['peak_gflops_start']:.0f} GFLOP/s", flush=True)
    rows = []
    for name in args.presets.split(","):
        tb, sb = DEFAULT_BATCH.get(name, (16, 32))
        rows += bench_preset(name, args.variants.split(","), args.reps, args.warmup, args.train_batch or tb,
                             args.sample_batch or sb, args.modes.split(","))
    meta["peak_gflops_end"] = measure_matmul_peak()
    meta["loadavg_end"] = load_average()
    meta["peak_gflops"] = max(meta["peak_gflops_start"], meta["peak_gflops_end"])
    meta["peak_gflops_bf16"] = measure_matmul_peak(dtype=torch.bfloat16)
    for r in rows:
        r["mfu"] = r["achieved_gflops"] / meta["peak_gflops"]
        if r["variant"] == "bf16":
            r["mfu_bf16"] = r["achieved_gflops"] / meta["peak_gflops_bf16"]
    table = markdown(meta, rows)
    print()
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        (out / "speed.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
