"""``iddpm`` command-line entry point.  Subcommands live in their own modules (lazy imports)."""

from __future__ import annotations

import argparse
import importlib
import sys

from iddpm.config import ConfigError

# name -> (module, one-line help).  Each module defines add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "demo": ("iddpm.cli.demo", "train a small model on the bundled digits, write samples, print test NLL"),
    "train": ("iddpm.cli.train", "train a diffusion model (image_train / super_res_train flags)"),
    "sample": ("iddpm.cli.sample", "generate samples from a run directory or checkpoint"),
    "upsample": ("iddpm.cli.upsample", "super-resolve base samples from an npz"),
    "nll": ("iddpm.cli.nll", "exact negative log-likelihood in bits/dim (calc_bpd_loop)"),
    "eval": ("iddpm.cli.evaluate", "FID / KID / IS / precision-recall between samples and a reference"),
    "plot": ("iddpm.cli.plot", "one PNG of a training run: losses, FID vs step, the latest sample grid"),
    "convert-openai": ("iddpm.cli.convert", "convert an improved-diffusion .pt checkpoint to iddpm format"),
    "presets": ("iddpm.cli.presets", "list the named presets and their settings"),
    "export": ("iddpm.cli.interop", "export a model to another library's format (diffusers DDPMPipeline)"),
    "import": ("iddpm.cli.interop", "import a model from another library's format (diffusers UNet2DModel)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iddpm",
        description="Improved denoising diffusion probabilistic models: train, sample, evaluate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:  # subcommand not built yet
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except ConfigError as exc:
        print(f"iddpm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"iddpm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
