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

from iddpm.cli.args import add_config_flags, add_run_flags, resolve_run_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser)
    add_run_flags(parser)
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (log lines only)")


def resolve(args: argparse.Namespace):
    """The RunConfig of this invocation.  With ``--resume`` the run directory's ``config.json`` is the base
    (flags still override it); with ``--resume_checkpoint`` the checkpoint's own config is."""
    from iddpm.checkpoints.run_dir import read_config, resolve_run_dir

    cfg = resolve_run_config(args)
    if not cfg.preset and cfg.data.data_dir in ("", "digits") and not cfg.train.resume \
            and not cfg.train.resume_checkpoint:
        # the embedded default: no data and no preset -> the digits preset (explicit flags still win)
        from iddpm.config import preset

        cfg = resolve_run_config(args, base=preset("digits"))
        print("iddpm train: no --data_dir and no --preset: the bundled digits with the 'digits' preset "
              "(see `iddpm presets`)", file=sys.stderr)
    if cfg.train.resume:
        run_dir = resolve_run_dir(cfg)
        if (run_dir / "config.json").is_file():
            cfg = resolve_run_config(args, base=read_config(run_dir))
    elif cfg.train.resume_checkpoint and not cfg.train.resume_checkpoint.endswith(".pt"):
        import dataclasses

        from iddpm.checkpoints.run_dir import load_checkpoint

        saved = load_checkpoint(cfg.train.resume_checkpoint, load_training_state=False).config
        fresh = dataclasses.replace(saved.train, run_dir="", resume=False, resume_checkpoint="")
        cfg = resolve_run_config(args, base=saved.replace(train=fresh))
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = resolve(args)
    if args.dry_run:
        print(cfg.to_json())
        return 0
    from iddpm.train.app import train
    from iddpm.train.trainer import NonFiniteLossError

    try:
        result = train(cfg, progress=not args.no_progress)
    except NonFiniteLossError as exc:
        print(f"iddpm train: error: {exc}", file=sys.stderr)
        return 1
    if result.last_checkpoint is not None:
        print(f"iddpm train: stopped at step {result.step} ({result.stop_reason}); "
              f"{result.images_per_second:.1f} img/s; checkpoint {result.last_checkpoint}", file=sys.stderr)
    return 0
