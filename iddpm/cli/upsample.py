"""``iddpm upsample``: super-resolve base samples with a super-resolution model (``super_res_sample.py``).

``--base_samples FILE.npz`` (arr_0 uint8 NHWC at the model's small size; arr_1 labels, required for
class-conditional models) -> ``--out`` folder with ``samples_{N}x{H}x{W}x{C}.npz`` (labels carried over
as arr_1), ``grid.png`` and ``sample_info.json`` (plus ``pngs/`` / trajectory on request).
"""

from __future__ import annotations

import argparse

from iddpm.cli.sample import (
    add_model_source_flags,
    add_sampling_flags,
    check_sampling_args,
    distributed_generate,
    sampling_info,
    write_outputs,
)
from iddpm.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_source_flags(parser)
    parser.add_argument("--base_samples", required=True, metavar="FILE.npz",
                        help="low-resolution samples (e.g. written by `iddpm sample`)")
    parser.add_argument("--num_samples", type=int, default=None,
                        help="upsample only the first N base samples (default: all)")
    add_sampling_flags(parser)
    parser.set_defaults(out="upsampled")


def run(args: argparse.Namespace) -> int:
    from iddpm.sample import load_npz, upsample

    images, labels = load_npz(args.base_samples)
    if args.num_samples is not None:
        if args.num_samples < 1:
            raise ConfigError(f"--num_samples {args.num_samples}: must be >= 1")
        images = images[: args.num_samples]
        labels = None if labels is None else labels[: args.num_samples]
    check_sampling_args(args)

    def fn(model, diffusion, cfg, device, rank, world_size, progress):
        m = cfg.model
        if not m.super_res:
            raise ConfigError(f"--run {args.run}: not a super-resolution model (trained without --small_size); "
                              "use `iddpm sample`")
        if images.shape[1:] != (m.small_size, m.small_size, m.in_channels):
            h, w, c = images.shape[1:]
            raise ConfigError(f"--base_samples {args.base_samples}: images are {h}x{w}x{c}, the model upsamples "
                              f"{m.small_size}x{m.small_size}x{m.in_channels}")
        if m.class_cond and labels is not None and labels.size and labels.max() >= m.num_classes:
            raise ConfigError(f"--base_samples {args.base_samples}: label {int(labels.max())} is out of range for a "
                              f"model with {m.num_classes} classes")
        return upsample(
            model, diffusion, images, large_size=m.image_size, base_labels=labels, class_cond=m.class_cond,
            num_classes=m.num_classes if m.class_cond else None, batch_size=args.batch_size, seed=args.seed,
            use_ddim=args.use_ddim, eta=args.eta, clip_denoised=args.clip_denoised, device=device,
            progress=progress, return_trajectory=args.trajectory is not None, rank=rank, world_size=world_size,
        )

    result, diffusion, cfg, elapsed = distributed_generate(args, fn)
    if result is None:  # not rank 0
        return 0
    info = sampling_info(args, cfg, diffusion, elapsed, result.images.shape[0])
    info["base_samples"] = str(args.base_samples)
    write_outputs(result, args, info)
    size = cfg.model.image_size
    print(f"upsampled {result.images.shape[0]} samples to {size}x{size} in {elapsed:.1f} s")
    return 0
