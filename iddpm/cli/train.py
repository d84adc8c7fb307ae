"""``iddpm train``: the original's image_train.py / super_res_train.py flags, plus presets, config files,
run directories, exact resume, mixed precision and torchrun/DDP.

Examples::

    iddpm train --run_dir runs/digits --max_minutes 5          # no data, no preset: the digits preset
    iddpm train --data_dir images/ --image_size 64 --num_channels 128 --batch_size 64 --run_dir runs/x
    iddpm train --resume --run_dir runs/x --max_steps 20000
    torchrun --nproc_per_node 2 -m iddpm train --config run.toml
"""

from __future__ import annotations

import argparse
import sys

from iddpm import api
from iddpm.cli.args import add_config_flags, add_run_flags, run_settings
from iddpm.config import uses_embedded_default
from iddpm.train.trainer import NonFiniteLossError, TrainingAborted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser)
    add_run_flags(parser)
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (log lines only)")


def _say(line: str) -> None:
    print(f"iddpm train: {line}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    settings, preset_name = run_settings(args), getattr(args, "preset", "") or ""
    cfg = api.train_config(settings, preset_name=preset_name, config_file=args.config)
    continuing = cfg.train.resume or bool(cfg.train.resume_checkpoint)  # the run's own config, not the default
    if cfg.preset == "digits" and uses_embedded_default(preset_name, settings) and not args.config and not continuing:
        print("iddpm train: no --data_dir and no --preset: the bundled digits with the 'digits' preset "
              "(see `iddpm presets`)", file=sys.stderr)
    if args.dry_run:
        print(cfg.to_json())
        return 0
    try:
        result = api.train(cfg, progress=not args.no_progress, log=_say)
    except NonFiniteLossError as exc:  # also fp16 loss-scale collapse
        print(f"iddpm train: error: {exc}", file=sys.stderr)
        return 1
    except TrainingAborted as exc:
        print(f"iddpm train: {exc}", file=sys.stderr)
        return 130
    if result.last_checkpoint is not None:
        print(f"iddpm train: stopped at step {result.step} ({result.stop_reason}); "
              f"{result.images_per_second:.1f} img/s; checkpoint {result.last_checkpoint}", file=sys.stderr)
    return 0
