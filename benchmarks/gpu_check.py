"""One command that verifies iddpm's GPU paths and measures their speed on one GPU.

Usage::

    python benchmarks/gpu_check.py            # on a CUDA machine: all checks + speed, about 8 minutes on one H200
    python benchmarks/gpu_check.py --quick    # checks + cifar10_uncond speed only, about 4 minutes
    python benchmarks/gpu_check.py --smoke    # no GPU needed: the same code on tiny configs (CPU self-test)

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` (default ``benchmarks/results/gpu/``; smoke runs
default to ``benchmarks/results/gpu-smoke/``) and prints the same tables.  Exit status: 0 when no check failed
(skipped checks, speed sections left out for time and missed speed targets do not fail the run), 1 when a check
failed or a speed measurement crashed (an OOM there: rerun with ``--batch_scale 0.5``), 2 when there is no CUDA
and ``--smoke`` was not given.

Checks (``gpu_check_lib``, ``gpu_check_kernels``, ``gpu_check_runs``; tolerances and their reasons are stated
there): Trainer steps in fp32 / TF32 / bf16 / fp16 vs a float64 CPU reference and a forced fp16 overflow;
``torch.compile`` of ``optimize(model, "train" / "sample")`` with ``fullgraph`` and no recompiles vs eager; fused
SDPA backends vs math; ``torchrun`` ``iddpm train`` / ``iddpm sample`` and an NCCL probe; same seed -> same
images for two batch sizes; exact resume with ``--deterministic``.  Speed (``gpu_check_speed``): five variants
interleaved, FLOPs, MFU against the device's dense peak, peak memory, and the issue's targets.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import gpu_check_kernels as kernels
import gpu_check_lib as lib
import gpu_check_runs as runs
import gpu_check_speed as speedlib
import torch

RESULTS = Path(__file__).resolve().parent / "results"
NO_GPU = "gpu_check: no CUDA GPU here; run it on a GPU machine, or add --smoke for the CPU self-test"


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny configs, 1-2 steps; runs on the CPU without a GPU")
    p.add_argument("--quick", action="store_true", help="shorter GPU run: checks + cifar10_uncond speed")
    p.add_argument("--device", default="", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--only", choices=("all", "checks", "speed"), default="all")
    p.add_argument("--budget_min", type=float, default=0.0,
                   help="wall-clock budget; speed sections that do not fit are skipped (default 8, quick 4)")
    p.add_argument("--reps", type=int, default=0, help="timed rounds per speed section (default 10, quick 5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch_scale", type=float, default=1.0, help="multiply the speed batches (e.g. 0.5 after an OOM)")
    p.add_argument("--cpu_runs", action="store_true",
                   help="with --smoke on the CPU: also run the torchrun and resume subprocess checks (slow)")
    p.add_argument("--out", default=None, help="results folder ('' = don't write)")
    return p.parse_args(argv)


def resolve_device(args) -> torch.device | None:
    """The device to check, or None when a GPU run was asked for and there is no CUDA."""
    spec = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return None
    if dev.type != "cuda" and not args.smoke:
        return None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    return dev


def describe(device: torch.device, args, argv) -> dict:
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "mode": "smoke" if args.smoke else "quick" if args.quick else "full", "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device), "host": platform.node(),
            "command": "python benchmarks/gpu_check.py " + " ".join(argv)}
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        meta.update(device_name=prop.name, capability=f"{prop.major}.{prop.minor}",
                    memory_gib=round(prop.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), gpus=torch.cuda.device_count())
    else:
        meta.update(device_name=speedlib.speed.cpu_model())
    return meta


def correctness(device, args, workdir: Path, log) -> list[lib.Check]:
    """Every correctness check, in order; each is logged as it finishes.  A crash inside a group of checks
    becomes one failed row (``run_check``), and the run goes on."""
    cuda = device.type == "cuda"
    small = lib.SMOKE if args.smoke else {}
    half = "bf16" if not cuda or torch.cuda.is_bf16_supported() else "fp16"
    steps = [
        ("precision", "train vs fp64", lambda: lib.precision_checks(device, steps=1 if args.smoke else 3, small=small)),
        ("precision", "fp16 overflow", lambda: lib.fp16_overflow_check(device, small)),
        ("compile", "compile", lambda: kernels.compile_checks(device, "inductor" if cuda else "eager", small,
                                                              with_bf16=not args.smoke)),
        ("sdpa", "sdpa", lambda: kernels.sdpa_checks(device, ("cifar10_uncond",) if args.smoke
                                                     else kernels.SDPA_PRESETS)),
        ("sampling", "same seed, batch 8 vs 4",
         lambda: runs.batch_invariance_check(device, small, 4 if args.smoke else 10)),
    ]
    subprocess_checks = [
        ("distributed", "torchrun iddpm train", lambda: runs.torchrun_train_check(device, workdir, small, half)),
        ("distributed", "torchrun iddpm sample", lambda: runs.torchrun_sample_check(device, workdir)),
        ("distributed", "NCCL probe", lambda: runs.nccl_probe_check(device, workdir)),
        ("resume", "exact resume", lambda: runs.resume_check(device, workdir, small, "fp16" if cuda else "fp32")),
    ]
    for group, name, fn in subprocess_checks:
        if cuda or args.cpu_runs:
            steps.append((group, name, fn))
        else:
            reason = "skipped: no CUDA (CPU versions: tests/e2e; --cpu_runs runs these here)"
            steps.append((group, name, lambda g=group, n=name, r=reason: lib.skipped(g, n, r)))
    out: list[lib.Check] = []
    for group, name, fn in steps:
        for c in lib.run_check(group, name, fn):
            log(f"{c.status:4s} {c.group}: {c.name}: {c.detail}")
            out.append(c)
    return out


def speed_rows(device, args, deadline: float, log) -> tuple[list[dict], dict]:
    plan = speedlib.SMOKE_PLAN if args.smoke else speedlib.QUICK_PLAN if args.quick else speedlib.FULL_PLAN
    reps = args.reps or (2 if args.smoke else 5 if args.quick else 10)
    warmup = 1 if args.smoke else args.warmup
    extra = speedlib.measured_peaks(device)
    log(f"measured matmul throughput: bf16 {extra['bf16_mm']:.1f}, tf32 {extra['tf32_mm']:.1f} TFLOP/s")
    plan = [(name, mode, mult * args.batch_scale, variants) for name, mode, mult, variants in plan]
    rows = speedlib.run_plan(plan, device, reps, warmup, "inductor" if device.type == "cuda" else "eager",
                             lambda: deadline - time.perf_counter(), log)
    return rows, extra


def fmt(v, spec: str = ".1f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def markdown(meta: dict, checks: list[lib.Check], rows: list[dict], goals: list[dict]) -> str:
    peaks = meta.get("peaks")
    peak_line = (f"dense peaks used for MFU ({peaks['label']}): bf16 {peaks['bf16']}, TF32 {peaks['tf32']}, "
                 f"fp32 {peaks['fp32']} TFLOP/s (NVIDIA datasheets, sparsity figures halved)" if peaks else
                 "MFU omitted: no dense peak known for this device")
    lines = [f"gpu_check ({meta['mode']}) {meta['date']} on {meta['device_name']} ({meta['device']}), torch "
             f"{meta['torch']}" + (f", CUDA {meta['cuda']}, cuDNN {meta['cudnn']}" if meta.get("cuda") else ""),
             f"Command: `{meta['command']}`; {meta['elapsed_s']:.0f} s.", "",
             f"Checks: {meta['passed']} passed, {meta['failed']} failed, {meta['skipped']} skipped; speed rows "
             f"failed: {meta['speed_failed']}.", "",
             "| group | check | result | detail | s |", "|---|---|---|---|---|"]
    lines += [f"| {c.group} | {c.name} | {c.status} | {c.detail} | {c.seconds:.1f} |" for c in checks]
    if meta.get("speed_error"):
        lines += ["", f"Speed part crashed: {meta['speed_error']}"]
    if rows:
        mm = meta.get("measured_mm_tflops", {})
        lines += ["", f"Speed (median of timed rounds, variants interleaved). {peak_line}; measured torch.mm: "
                  f"bf16 {fmt(mm.get('bf16_mm'))}, TF32 {fmt(mm.get('tf32_mm'))} TFLOP/s.", "",
                  "| preset | mode | variant | batch | median | min-max | unit | GFLOP/img fwd | TFLOP/s | MFU | "
                  "peak GiB | first call s | status |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ok = r.get("status") == "ok"
            lines.append(
                f"| {r['preset']} | {r['mode']} | {r['variant']} | {r['batch']} | {fmt(r.get('median'))} | "
                + (f"{r['min']:.1f}-{r['max']:.1f}" if ok else "-") + f" | {r.get('unit', '')} | "
                f"{fmt(r.get('fwd_gflop_per_img'), '.2f')} | {fmt(r.get('achieved_tflops'), '.2f')} | "
                + (f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-") + f" | {fmt(r.get('peak_mem_gib'), '.2f')} | "
                f"{fmt(r.get('first_call_s'))} | {r.get('status')} |")
        lines += ["", "fp32 = IEEE float32 (TF32 off); bf16 = autocast; +compile = torch.compile (NCHW); +cl = "
                  "optimize(): channels_last + compile (the default CUDA path). Training = training_losses + "
                  "backward + AdamW; sampling = one p_sample step. Peak GiB = the variant's own peak (weights, "
                  "grads, AdamW state, activations)."]
    if goals:
        lines += ["", "| target | measured | goal | result |", "|---|---|---|---|"]
        lines += [f"| {g['target']} | {g['measured']} | {g['goal']} | {g['status']} |" for g in goals]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    device = resolve_device(args)
    if device is None:
        print(NO_GPU)
        return 2
    t_start = time.perf_counter()
    budget = 60 * (args.budget_min or (30 if args.smoke else 4 if args.quick else 8))
    meta = describe(device, args, argv)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:5.0f}s] {msg}", flush=True)

    log(f"gpu_check {meta['mode']} on {meta['device_name']} ({device}), torch {meta['torch']}")
    checks: list[lib.Check] = []
    rows: list[dict] = []
    if args.only in ("all", "checks"):
        with tempfile.TemporaryDirectory(prefix="iddpm_gpu_check_") as tmp:
            checks = correctness(device, args, Path(tmp), log)
    if args.only in ("all", "speed"):
        try:
            rows, meta["measured_mm_tflops"] = speed_rows(device, args, t_start + budget, log)
        except Exception as exc:  # keep the checks' report; the speed part's crash is reported in it
            meta["speed_error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
            log(f"speed: crashed: {meta['speed_error']}")
    meta["peaks"] = speedlib.device_peaks(meta["device_name"]) if device.type == "cuda" else None
    speedlib.add_mfu(rows, meta["peaks"])
    goals = speedlib.targets(rows, "small" if args.smoke else "cifar10_uncond", meta["peaks"]) if rows else []
    meta["speed_failed"] = sum(str(r.get("status", "")).startswith("failed") for r in rows)
    meta.update(elapsed_s=time.perf_counter() - t_start, budget_s=budget,
                **{k: sum(c.status == v for c in checks) for k, v in
                   (("passed", "pass"), ("failed", "fail"), ("skipped", "skip"))})
    table = markdown(meta, checks, rows, goals)
    print()
    print(table)
    out = args.out if args.out is not None else str(RESULTS / ("gpu-smoke" if args.smoke else "gpu"))
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        data = {"meta": meta, "checks": [c.as_dict() for c in checks], "speed": rows, "targets": goals}
        (folder / "gpu_check.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        (folder / "gpu_check.md").write_text(table + "\n")
        print(f"\nwrote {folder / 'gpu_check.md'} and gpu_check.json")
    return 1 if meta["failed"] or meta["speed_failed"] or meta.get("speed_error") else 0


if __name__ == "__main__":
    sys.exit(main())
