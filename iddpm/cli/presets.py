"""``iddpm presets``: list the named presets."""

from __future__ import annotations

import argparse

from iddpm.config import PRESETS, RELEASED_CHECKPOINTS, preset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="show one preset's resolved config")


def run(args: argparse.Namespace) -> int:
    if args.name:
        print(preset(args.name).to_json())
        return 0
    for name, flags in PRESETS.items():
        ckpt = RELEASED_CHECKPOINTS.get(name)
        extra = f"  (loads {ckpt})" if ckpt else ""
        print(f"{name}{extra}")
        print("    " + " ".join(f"--{k} {v}" for k, v in flags.items()))
    return 0
