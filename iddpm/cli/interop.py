"""``iddpm export diffusers RUN OUT/`` and ``iddpm import diffusers FOLDER --out MODEL.safetensors``.

One module serves both subcommands (``export`` and ``import`` in ``iddpm.cli.main.SUBCOMMANDS``): the direction is
the subcommand's own name, the last word of the parser's ``prog`` ("iddpm export"); the format ("diffusers", the
only one so far) is a nested subcommand so that others can join it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from iddpm.config import ConfigError

_FORMATS = ("diffusers",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    direction = parser.prog.rsplit(" ", 1)[-1]
    if direction not in ("export", "import"):
        raise ValueError(f"iddpm.cli.interop serves the export and import subcommands, not {parser.prog!r}")
    parser.set_defaults(interop_direction=direction)
    formats = parser.add_subparsers(dest="interop_format", metavar="FORMAT", required=True)
    if direction == "export":
        p = formats.add_parser("diffusers", help="write a diffusers DDPMPipeline folder (unet/, scheduler/, README)",
                               description="Write a folder that diffusers.DDPMPipeline.from_pretrained(OUT) loads, "
                                           "with exactly the model's outputs; models UNet2DModel cannot express are "
                                           "refused with the reason.")
        p.add_argument("run", metavar="RUN",
                       help="run directory, checkpoints/step_* folder or iddpm .safetensors model file")
        p.add_argument("out", metavar="OUT", help="new (or empty) output folder")
        p.add_argument("--no_ema", dest="use_ema", action="store_false", help="export the raw weights, not the EMA")
        p.add_argument("--ema_rate", default=None, metavar="R",
                       help="which EMA weights (default: the run's first rate)")
    else:
        p = formats.add_parser("diffusers", help="convert a diffusers UNet2DModel pipeline folder to an iddpm model",
                               description="Convert a diffusers pipeline folder (UNet2DModel of the DDPM/ADM shape + "
                                           "DDPMScheduler) into an iddpm model file for `iddpm sample/nll --run`.")
        p.add_argument("folder", metavar="FOLDER",
                       help="diffusers pipeline folder (model_index.json, unet/, scheduler/)")
        p.add_argument("--out", required=True, metavar="MODEL.safetensors", help="output iddpm model file")
        p.add_argument("--force", action="store_true", help="overwrite an existing output file")


def run(args: argparse.Namespace) -> int:
    from iddpm import api

    if args.interop_direction == "export":
        out = api.export_diffusers(args.run, args.out, use_ema=args.use_ema, ema_rate=args.ema_rate)
        print(f"wrote {out} (load it with diffusers.DDPMPipeline.from_pretrained({str(out)!r}))")
        return 0
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: an iddpm model file ends in .safetensors")
    if out.exists() and not args.force:
        raise ConfigError(f"--out {out}: file exists; pass --force to overwrite or choose another path")
    path = api.import_diffusers(args.folder, out)
    print(f"wrote {path} (use it with `iddpm sample --run {path}` / `iddpm nll --run {path}`)")
    return 0
