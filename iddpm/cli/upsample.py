"""``iddpm upsample``: super-resolve base samples with a super-resolution model (``super_res_sample.py``).

``--base_samples FILE.npz`` (arr_0 uint8 NHWC at the model's small size; arr_1 labels, required for
class-conditional models) -> ``--out`` folder (default ``upsampled``) with ``samples_{N}x{H}x{W}x{C}.npz``
(labels carried over as arr_1), ``grid.png`` and ``sample_info.json`` (plus ``pngs/`` / trajectory on request).
``--num_samples N`` upsamples only the first N base samples (default: all).
"""

from __future__ import annotations

import argparse

from iddpm import api
from iddpm.cli.sample import add_model_source_flags, add_sampling_flags, common_kwargs, report
from iddpm.config import SampleConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_source_flags(parser)
    parser.add_argument("--base_samples", required=True, metavar="FILE.npz",
                        help="low-resolution samples (e.g. written by `iddpm sample`)")
    add_sampling_flags(parser)


def run(args: argparse.Namespace) -> int:
    result = api.upsample(args.run, args.base_samples, save=True, **common_kwargs(args, SampleConfig))
    if result is not None:  # rank 0
        report(result, f"samples upsampled to {result.images.shape[1]}x{result.images.shape[2]}")
    return 0
