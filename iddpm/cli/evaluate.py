"""``iddpm eval SAMPLES REFERENCE``: FID / KID / IS / precision-recall between two image sets.

Flags are the fields of :class:`~iddpm.config.EvalConfig`.
"""

from __future__ import annotations

import argparse

from iddpm import api
from iddpm.cli.args import add_section_flags, given
from iddpm.config import EvalConfig
from iddpm.eval.evaluate import format_summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("samples", metavar="SAMPLES",
                        help="samples: .npz (arr_0 uint8 NHWC, as `iddpm sample` writes), image folder, "
                             "or a statistics .npz (FID only unless saved with --save_features)")
    parser.add_argument("reference", metavar="REFERENCE",
                        help="reference: .npz, image folder, statistics .npz, or digits-test / digits-train / "
                             "digits-all (the bundled digits split)")
    add_section_flags(parser.add_argument_group("metrics"), EvalConfig)
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    result = api.evaluate(args.samples, args.reference, progress=not args.no_progress, json_out=args.json,
                          **given(args, EvalConfig))
    print(f"iddpm eval: {args.samples} vs {args.reference}")
    print(format_summary(result))
    if args.json:
        print(f"wrote {args.json}")
    return 0
