"""``iddpm sample``: generate images from a run directory, a checkpoint, or the original's ``.pt``.

Writes into ``--out`` (default ``samples``): ``samples_{N}x{H}x{W}x{C}.npz`` in the original's layout
(``arr_0`` uint8 NHWC, ``arr_1`` labels for class-conditional models), ``grid.png`` (the first
``--grid_size`` samples), ``sample_info.json`` (the settings used), optionally ``pngs/`` (one PNG per
sample) and ``trajectory.png`` / ``trajectory.gif`` (denoising trajectory of the first samples).
``--sampler dpm++2m --steps 15 [--schedule karras|logsnr|uniform]`` samples with a few-step solver (NFE = steps,
reported on the last line); ``--timestep_respacing`` / ``--use_ddim`` keep their meaning for ancestral / DDIM.
Flags are the fields of :class:`~iddpm.config.SampleConfig` and :class:`~iddpm.config.SourceConfig`; the
original's ``image_sample.py`` names (``--model_path``) are accepted.
"""

from __future__ import annotations

import argparse
from typing import Any

from iddpm import api
from iddpm.cli.args import add_config_flags, add_section_flags, given, run_settings, str2bool
from iddpm.config import SampleConfig, SourceConfig


def add_model_source_flags(parser: argparse.ArgumentParser) -> None:
    """--run/--model_path, --preset, --ema/--no_ema, --ema_rate, --device, --fast, and the model/diffusion flags."""
    src = parser.add_argument_group("model source")
    src.add_argument("--run", "--model_path", dest="run", required=True, metavar="PATH",
                     help="run directory (latest checkpoint), checkpoints/step_* folder, .safetensors model file, "
                          "or an improved-diffusion .pt (needs --preset or model/diffusion flags); --model_path is "
                          "the original's name (use it under torchrun, whose own --run_path swallows --run)")
    src.add_argument("--ema", dest="use_ema", action="store_const", const=True, default=argparse.SUPPRESS,
                     help="EMA weights (default)")
    src.add_argument("--no_ema", dest="use_ema", action="store_const", const=False, default=argparse.SUPPRESS,
                     help="the raw (non-EMA) weights")
    src.add_argument("--use_ema", dest="use_ema", type=str2bool, metavar="BOOL", default=argparse.SUPPRESS,
                     help="same as --ema / --no_ema")
    add_section_flags(src, SourceConfig, skip=("run", "use_ema"))
    add_config_flags(parser, sections=("model", "diffusion"),
                     group_help="iddpm checkpoints carry their settings (only diffusion settings may be changed); "
                                "an original .pt takes them from --preset, then these flags. The defaults shown "
                                "are those of a .pt loaded without --preset.")


def add_sampling_flags(parser: argparse.ArgumentParser, skip=()) -> None:
    g = parser.add_argument_group("sampling")
    add_section_flags(g, SampleConfig, skip=("classes", *skip))
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_source_flags(parser)
    add_sampling_flags(parser)
    cls = parser.add_argument_group("what to sample").add_mutually_exclusive_group()
    cls.add_argument("--class", dest="classes", default=argparse.SUPPRESS, metavar="K",
                     help="class-conditional models: every sample of class K")
    cls.add_argument("--balanced", dest="classes", action="store_const", const="balanced",
                     help="class-conditional models: labels 0,1,..,num_classes-1,0,1,.. (default: random)")


def model_overrides(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """The model/diffusion flags given explicitly (flat dict) and --timestep_respacing (None if absent)."""
    flat = run_settings(args, sections=("model", "diffusion"))
    return flat, flat.pop("timestep_respacing", None)


def common_kwargs(args: argparse.Namespace, *sections: type) -> dict[str, Any]:
    """What every model-loading command passes to the API: the given flags of ``sections`` + the source flags,
    the model/diffusion overrides, the respacing, progress and a console log."""
    overrides, respacing = model_overrides(args)
    kwargs: dict[str, Any] = {}
    for cls in (*sections, SourceConfig):
        kwargs.update(given(args, cls))
    kwargs.pop("run", None)  # positional in every API call
    return dict(kwargs, overrides=overrides, timestep_respacing=respacing, progress=not args.quiet, log=print)


def report(result, what: str) -> None:
    """The files written, then one line: the speed of a sampling command, its sampler and NFE (model evaluations
    per sample) (rank 0)."""
    for p in result.files or []:
        print(f"wrote {p}")
    info = result.info
    n, nfe = result.images.shape[0], info.get("nfe", info["num_sampling_steps"])
    batches = -(-n // info["batch_size"])
    method = info.get("sampler", "ancestral") + (f" on the {info['schedule']} grid" if info.get("schedule") else "")
    print(f"{n} {what} in {result.seconds:.1f} s ({n / result.seconds:.2f} samples/s, "
          f"{nfe * batches / result.seconds:.1f} batch steps/s); {method}, NFE {nfe}")


def run(args: argparse.Namespace) -> int:
    kwargs = common_kwargs(args, SampleConfig)
    result = api.sample(args.run, save=True, **kwargs)
    if result is not None:  # rank 0
        report(result, "samples")
    return 0
