"""``iddpm sample``: generate images from a run directory, a checkpoint, or the original's ``.pt``.

Writes into ``--out`` (default ``samples``): ``samples_{N}x{H}x{W}x{C}.npz`` in the original's layout
(``arr_0`` uint8 NHWC, ``arr_1`` labels for class-conditional models), ``grid.png`` (the first
``--grid_size`` samples), ``sample_info.json`` (the settings used), optionally ``pngs/`` (one PNG per
sample) and ``trajectory.png`` / ``trajectory.gif`` (denoising trajectory of the first samples).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from iddpm.cli.args import add_config_flags, str2bool
from iddpm.config import ConfigError


def add_model_source_flags(parser: argparse.ArgumentParser) -> None:
    """--run, --preset, --ema/--no_ema, --ema_rate, --device, --fast, and the model/diffusion flags for .pt files."""
    src = parser.add_argument_group("model source")
    src.add_argument("--run", "--model_path", dest="run", required=True, metavar="PATH",
                     help="run directory (latest checkpoint), checkpoints/step_* folder, .safetensors model file, "
                          "or an improved-diffusion .pt (needs --preset or model/diffusion flags); --model_path is "
                          "the original's name (use it under torchrun, whose own --run_path swallows --run)")
    src.add_argument("--preset", default=None, help="settings for an original .pt checkpoint (see `iddpm presets`)")
    src.add_argument("--ema", dest="use_ema", action="store_true", default=True, help="EMA weights (default)")
    src.add_argument("--no_ema", dest="use_ema", action="store_false", help="the raw (non-EMA) weights")
    src.add_argument("--use_ema", dest="use_ema", type=str2bool, metavar="BOOL", help="same as --ema / --no_ema")
    src.add_argument("--ema_rate", dest="sample_ema_rate", default=None, metavar="RATE",
                     help="which EMA file when a checkpoint has several (default: the first of the run's --ema_rate)")
    src.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    src.add_argument("--fast", type=str2bool, nargs="?", const=True, default=True, metavar="BOOL",
                     help="channels_last fast path (+ torch.compile on CUDA) (default true)")
    add_config_flags(parser, sections=("model", "diffusion"),
                     group_help="iddpm checkpoints carry their settings (only diffusion settings may be changed); "
                                "an original .pt takes them from --preset, then these flags. The defaults shown "
                                "are those of a .pt loaded without --preset.")


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--use_ddim", type=str2bool, nargs="?", const=True, default=False, metavar="BOOL",
                   help="DDIM steps instead of ancestral sampling (use with --timestep_respacing ddimN)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    g.add_argument("--clip_denoised", type=str2bool, nargs="?", const=True, default=True, metavar="BOOL",
                   help="clamp the x_0 prediction to [-1, 1] at every step (default true)")
    g.add_argument("--batch_size", type=int, default=64, help="samples per forward pass (does not change the images)")
    g.add_argument("--seed", type=int, default=0, help="sample i's noise comes from (seed, i)")
    g.add_argument("--out", default="samples", help="output folder (default ./samples)")
    g.add_argument("--save_pngs", action="store_true", help="also write one PNG per sample into OUT/pngs/")
    g.add_argument("--trajectory", choices=("strip", "gif"), default=None,
                   help="write the denoising trajectory of the first samples as a PNG strip or a GIF")
    g.add_argument("--grid_size", type=int, default=64, help="samples in grid.png (default 64; 0 = none)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_source_flags(parser)
    add_sampling_flags(parser)
    g = parser.add_argument_group("what to sample")
    g.add_argument("--num_samples", type=int, default=64, help="number of samples (default 64)")
    cls = g.add_mutually_exclusive_group()
    cls.add_argument("--class", dest="class_label", type=int, default=None, metavar="K",
                     help="class-conditional models: every sample of class K")
    cls.add_argument("--balanced", action="store_true",
                     help="class-conditional models: labels 0,1,..,num_classes-1,0,1,.. (default: random)")


def resolve_device(name: str) -> str:
    """``auto`` -> cuda when available else cpu; a clear error for an unavailable device."""
    from iddpm.runtime.distributed import resolve_device as _resolve

    return str(_resolve(name))


def overrides_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """The model/diffusion flags given explicitly (flat dict) and --timestep_respacing (None if absent)."""
    from dataclasses import fields

    from iddpm.cli.args import SECTIONS

    flat = {}
    for sec in ("model", "diffusion"):
        for f in fields(SECTIONS[sec]):
            if hasattr(args, f.name):
                flat[f.name] = getattr(args, f.name)
    respacing = flat.pop("timestep_respacing", None)
    return flat, respacing


def check_sampling_args(args: argparse.Namespace) -> None:
    if (getattr(args, "num_samples", None) or 1) < 1 or getattr(args, "num_samples", None) == 0:
        raise ConfigError(f"--num_samples {args.num_samples}: must be >= 1")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size {args.batch_size}: must be >= 1")
    if args.eta < 0:
        raise ConfigError(f"--eta {args.eta}: must be >= 0 (0 = deterministic DDIM)")
    if args.eta and not args.use_ddim:
        raise ConfigError(f"--eta {args.eta}: only used with --use_ddim; add --use_ddim or drop --eta")


def load_for_sampling(args: argparse.Namespace, device: str | None = None, verbose: bool = True):
    """(model, diffusion, cfg, device) from the model-source flags; prints what was loaded."""
    from iddpm.api import load_run

    device = device or resolve_device(args.device)
    overrides, respacing = overrides_from_args(args)
    model, diffusion, cfg = load_run(args.run, use_ema=args.use_ema, ema_rate=args.sample_ema_rate,
                                     preset=args.preset, overrides=overrides, device=device,
                                     timestep_respacing=respacing)
    if args.fast:
        from iddpm.models import optimize

        model = optimize(model, mode="sample")
    if getattr(args, "use_ddim", None) is None:  # nll
        what = f"{diffusion.num_timesteps} timesteps"
    else:
        kind = f"DDIM eta={args.eta}" if args.use_ddim else "ancestral"
        what = f"{diffusion.num_timesteps} sampling steps ({kind})"
    if verbose:
        src = weights_source(args)
        if src.endswith(".pt"):
            src += f" (preset {cfg.preset})" if cfg.preset else " (settings from flags)"
        print(f"loaded {src} on {device}; {what}")
    return model, diffusion, cfg, device


def distributed_generate(args: argparse.Namespace, fn) -> tuple[object, object, object, float]:
    """Run ``fn(model, diffusion, cfg, device, rank, world_size, progress) -> SampleResult`` on every process
    (one under plain ``iddpm``, N under ``torchrun``) and gather the shares: ``(result or None off rank 0,
    diffusion, cfg, seconds)``.  Batches are dealt round-robin; per-sample seeds make the images independent
    of the number of processes."""
    from iddpm.runtime.distributed import init_distributed
    from iddpm.sample import gather_results

    ctx = init_distributed(args.device)
    try:
        model, diffusion, cfg, device = load_for_sampling(args, device=str(ctx.device), verbose=ctx.is_main)
        start = time.perf_counter()
        part = fn(model, diffusion, cfg, device, ctx.rank, ctx.world_size, not args.quiet and ctx.is_main)
        parts = ctx.all_gather_object(part)
        elapsed = time.perf_counter() - start
        return (gather_results(parts) if ctx.is_main else None), diffusion, cfg, elapsed
    finally:
        ctx.shutdown()


def weights_source(args: argparse.Namespace) -> str:
    """The weights file a --run argument resolves to (what load_run reads)."""
    from iddpm.api import pick_weights_file, resolve_checkpoint

    src = resolve_checkpoint(args.run)
    if src.is_dir():
        src = pick_weights_file(src, args.use_ema, args.sample_ema_rate)
    return str(src)


def write_outputs(result, args: argparse.Namespace, info: dict[str, Any]) -> Path:
    """npz + grid + sample_info.json (+ pngs, trajectory) into args.out; returns the npz path."""
    from iddpm.runtime.atomic import atomic_write_text
    from iddpm.sample import save_grid, save_npz, save_pngs, save_trajectory

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    npz = save_npz(out, result.images, result.labels)
    written = [npz]
    if args.grid_size > 0:
        written.append(save_grid(result.images[: args.grid_size], out / "grid.png"))
    if args.save_pngs:
        save_pngs(result.images, out / "pngs", labels=result.labels)
        written.append(out / "pngs")
    if result.trajectory is not None:
        suffix = ".gif" if args.trajectory == "gif" else ".png"
        written.append(save_trajectory(result.trajectory, out / f"trajectory{suffix}", fmt=args.trajectory))
    atomic_write_text(out / "sample_info.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    for p in written:
        print(f"wrote {p}")
    return npz


def run(args: argparse.Namespace) -> int:
    from iddpm.sample import generate

    check_sampling_args(args)
    if args.class_label is not None and args.class_label < 0:
        raise ConfigError(f"--class {args.class_label}: must be >= 0")
    classes = args.class_label if args.class_label is not None else ("balanced" if args.balanced else None)

    def fn(model, diffusion, cfg, device, rank, world_size, progress):
        if cfg.model.super_res:
            raise ConfigError(f"--run {args.run}: a super-resolution model; use `iddpm upsample --base_samples "
                              "FILE.npz`")
        return generate(
            model, diffusion, num_samples=args.num_samples, batch_size=args.batch_size,
            image_shape=(cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size), seed=args.seed,
            use_ddim=args.use_ddim, eta=args.eta, clip_denoised=args.clip_denoised, classes=classes,
            num_classes=cfg.model.num_classes if cfg.model.class_cond else None, device=device, progress=progress,
            return_trajectory=args.trajectory is not None, rank=rank, world_size=world_size,
        )

    result, diffusion, cfg, elapsed = distributed_generate(args, fn)
    if result is None:  # not rank 0
        return 0
    n = result.images.shape[0]
    info = sampling_info(args, cfg, diffusion, elapsed, n)
    info["classes"] = "balanced" if args.balanced else args.class_label
    write_outputs(result, args, info)
    print(f"{n} samples in {elapsed:.1f} s ({n / elapsed:.2f} samples/s, "
          f"{diffusion.num_timesteps * -(-n // args.batch_size) / elapsed:.1f} batch steps/s)")
    return 0


def sampling_info(args: argparse.Namespace, cfg, diffusion, elapsed: float, n: int) -> dict[str, Any]:
    return {
        "run": str(args.run),
        "weights": weights_source(args),
        "use_ema": bool(args.use_ema),
        "num_samples": int(n),
        "batch_size": args.batch_size,
        "seed": args.seed,
        "timestep_respacing": cfg.diffusion.timestep_respacing,
        "num_sampling_steps": int(diffusion.num_timesteps),
        "use_ddim": bool(args.use_ddim),
        "eta": args.eta,
        "clip_denoised": bool(args.clip_denoised),
        "seconds": round(elapsed, 3),
        "config": cfg.to_dict(),
    }
