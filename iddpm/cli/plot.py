"""``iddpm plot RUN``: one PNG of a training run -- losses, FID vs step, the latest sample grid.

Reads the run directory alone (``metrics.csv``, ``eval.csv``, ``samples/``); see :mod:`iddpm.eval.report`.
"""

from __future__ import annotations

import argparse

from iddpm import api


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory (the --run_dir of `iddpm train`)")
    parser.add_argument("--out", default=None, metavar="PNG", help="where to write it (default RUN/report.png)")


def run(args: argparse.Namespace) -> int:
    print(f"wrote {api.plot_run(args.run, out=args.out)}")
    return 0
