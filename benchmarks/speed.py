"""Training and sampling speed of the U-Net presets, with FLOPs and the fraction of fp32 matmul peak.

Usage::

    python benchmarks/speed.py                       # digits + cifar-small + cifar10_uncond, all variants
    python benchmarks/speed.py --presets cifar-small --reps 7 --json results/speed.json

What is measured (all in one process, variants interleaved so machine noise hits all alike):

* training: forward + ``training_losses`` (the preset's loss) + backward + AdamW step, img/s;
* sampling: one ancestral ``p_sample`` step (network forward under ``torch.no_grad`` + update), img-steps/s;
* forward FLOPs from ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts 2);
  training FLOPs are taken as 3x forward;
* the machine's fp32 matmul peak, measured in the same run (best of several 2048^3 ``torch.mm``),
  and MFU = achieved GFLOP/s / peak.

Variants: ``eager`` (fp32 NCHW, no optimisation), ``fast`` (``iddpm.models.optimize`` — what
``iddpm train``/``iddpm sample`` use by default), ``compile`` (``optimize`` + ``torch.compile``)
and ``bf16`` (``fast`` under bf16 autocast).  Each reported figure is the median of ``--reps``
timed repetitions (after warm-up), with min and max.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from iddpm.api import build_diffusion, build_model
from iddpm.config import preset
from iddpm.models import optimize

DEFAULT_BATCH = {"digits": (128, 256), "cifar-small": (32, 64), "cifar10_uncond": (8, 16)}


def measure_matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best fp32 ``torch.mm`` throughput in GFLOP/s over ``reps`` runs of an n^3 product."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def forward_flops(model, x, t, kwargs) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, **kwargs)
    return int(counter.get_total_flops())


class Variant:
    """One way of running the model: builds its own copy so variants do not share layouts."""

    def __init__(self, name: str, base_model, mode: str):
        self.name = name
        model = copy.deepcopy(base_model)
        self.autocast = name == "bf16"
        if name == "eager":
            self.module = model
        elif name in ("fast", "bf16"):
            self.module = optimize(model, mode=mode)
        elif name == "compile":
            self.module = optimize(model, mode=mode, compile=True)
        else:
            raise ValueError(name)
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if mode == "train" else None

    def ctx(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else torch.autocast("cpu", enabled=False)


def time_train_step(v: Variant, diffusion, x, kwargs, gen) -> float:
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), generator=gen)
    t0 = time.perf_counter()
    with v.ctx():
        losses = diffusion.training_losses(v.module, x, t, model_kwargs=kwargs)
    loss = losses["loss"].float().mean()
    v.opt.zero_grad(set_to_none=True)
    loss.backward()
    v.opt.step()
    return time.perf_counter() - t0


def time_sample_step(v: Variant, diffusion, x, kwargs) -> float:
    t = torch.full((x.shape[0],), diffusion.num_timesteps // 2, dtype=torch.long)
    t0 = time.perf_counter()
    with torch.no_grad(), v.ctx():
        diffusion.p_sample(v.module, x, t, model_kwargs=kwargs)
    return time.perf_counter() - t0


def summarize(times: list[float], batch: int) -> dict:
    rates = sorted(batch / s for s in times)
    return {"median": statistics.median(rates), "min": rates[0], "max": rates[-1], "n": len(rates)}


def bench_preset(name: str, variants: list[str], reps: int, warmup: int, train_batch: int, sample_batch: int,
                 peak: float) -> list[dict]:
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
    for mode, batch in (("train", train_batch), ("sample", sample_batch)):
        x = torch.randn(batch, *shape, generator=gen).clamp(-1, 1)
        kw = kwargs_for(batch)
        model.train(mode == "train")
        flops_fwd = forward_flops(model, x, torch.zeros(batch, dtype=torch.long), kw)
        built = []
        for vn in variants:
            try:
                v = Variant(vn, model, mode)
                v.module.train(mode == "train")
                built.append(v)
            except Exception as exc:  # e.g. compile unavailable
                print(f"  {name} {mode} {vn}: skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
        times: dict[str, list[float]] = {v.name: [] for v in built}
        for i in range(warmup + reps):
            for v in built:
                try:
                    if mode == "train":
                        dt = time_train_step(v, diffusion, x, kw, gen)
                    else:
                        dt = time_sample_step(v, diffusion, x, kw)
                except Exception as exc:
                    print(f"  {name} {mode} {v.name}: failed ({type(exc).__name__}: {exc})", file=sys.stderr)
                    times.pop(v.name, None)
                    built = [b for b in built if b is not v]
                    continue
                if i >= warmup:
                    times[v.name].append(dt)
        for vn, ts in times.items():
            if not ts:
                continue
            s = summarize(ts, batch)
            step_flops = flops_fwd * (3 if mode == "train" else 1)
            gflops = step_flops / batch * s["median"] / 1e9
            rows.append(dict(preset=name, mode=mode, variant=vn, batch=batch, unit="img/s" if mode == "train"
                             else "img-steps/s", **s, fwd_gflop_per_img=flops_fwd / batch / 1e9,
                             achieved_gflops=gflops, mfu=gflops / peak))
            print(f"  {name:15s} {mode:6s} {vn:8s} b={batch:<4d} median {s['median']:8.2f} "
                  f"(min {s['min']:.2f}, max {s['max']:.2f}) {rows[-1]['unit']}  {gflops:6.1f} GFLOP/s "
                  f"MFU {100 * gflops / peak:4.1f}%", flush=True)
    return rows


def markdown(rows: list[dict], peak: float) -> str:
    lines = [f"fp32 matmul peak measured in this run: {peak:.0f} GFLOP/s", "",
             "| preset | mode | variant | batch | median | min-max | unit | GFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['mode']} | {r['variant']} | {r['batch']} | {r['median']:.1f} | "
                     f"{r['min']:.1f}-{r['max']:.1f} | {r['unit']} | {r['achieved_gflops']:.1f} | "
                     f"{100 * r['mfu']:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="digits,cifar-small,cifar10_uncond")
    p.add_argument("--variants", default="eager,fast,compile,bf16")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--train_batch", type=int, default=0, help="0 = per-preset default")
    p.add_argument("--sample_batch", type=int, default=0, help="0 = per-preset default")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--json", default="", help="write the rows as JSON here")
    p.add_argument("--markdown", default="", help="write the markdown table here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = measure_matmul_peak()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul peak {peak:.0f} GFLOP/s",
          flush=True)
    rows = []
    for name in args.presets.split(","):
        tb, sb = DEFAULT_BATCH.get(name, (16, 32))
        rows += bench_preset(name, args.variants.split(","), args.reps, args.warmup, args.train_batch or tb,
                             args.sample_batch or sb, peak)
    table = markdown(rows, peak)
    print()
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"peak_gflops": peak, "torch": torch.__version__, "rows": rows},
                                              indent=2))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
