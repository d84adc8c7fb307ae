"""``iddpm convert-openai FILE.pt --preset NAME [-o OUT.safetensors] [model/diffusion flags]``.

Reads an improved-diffusion checkpoint safely (``torch.load(weights_only=True)``), checks it against
the model of the preset/flags (a mismatch names the keys and the preset that fits) and writes iddpm's
model file (safetensors + the full config in its metadata), which ``iddpm sample`` / ``nll`` load alone.
Without ``--preset`` (and ``--config``) the preset is taken from a released file name or from the one
preset whose layout fits; otherwise the model flags alone describe the model.
"""

from __future__ import annotations

import argparse

from iddpm import api
from iddpm.cli.args import add_config_flags, add_run_flags, run_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="improved-diffusion .pt file (e.g. cifar10_uncond_50M_500K.pt)")
    parser.add_argument("-o", "--output", default=None,
                        help="output .safetensors file (default: the input path with suffix .safetensors)")
    parser.add_argument("--sidecar", action="store_true", help="also write config.json beside the output")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    add_run_flags(parser)
    add_config_flags(parser, sections=("model", "diffusion"))


def run(args: argparse.Namespace) -> int:
    out, cfg = api.convert_openai(args.checkpoint, args.output, settings=run_settings(args, ("model", "diffusion")),
                                  preset_name=getattr(args, "preset", "") or "", config_file=args.config,
                                  force=args.force, sidecar=args.sidecar, dry_run=args.dry_run, log=print)
    if out is None:
        print(cfg.to_json())
    return 0
