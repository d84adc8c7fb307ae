"""``iddpm nll``: exact negative log-likelihood in bits/dim (the original's ``image_nll.py`` / ``calc_bpd_loop``).

Prints the mean bits/dim with its standard error and the breakdown (prior term, t = 0 decoder term, sum of
the per-step terms) and writes the per-timestep terms (ascending t) to ``--out`` (.csv, .npz or .json).
Flags are the fields of :class:`~iddpm.config.NLLConfig`; the original's ``--num_samples`` and
``--model_path`` are accepted.  Under ``torchrun`` every process evaluates every world_size-th batch.
"""

from __future__ import annotations

import argparse

from iddpm import api
from iddpm.cli.args import add_section_flags
from iddpm.cli.sample import add_model_source_flags, common_kwargs
from iddpm.config import NLLConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_source_flags(parser)
    g = parser.add_argument_group("evaluation data")
    add_section_flags(g, NLLConfig, names={"num_examples": ["--num_samples"]})
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    res = api.nll(args.run, save=True, **common_kwargs(args, NLLConfig))
    if res is None:  # not rank 0
        return 0
    procs = f", {res.num_processes} processes" if res.num_processes > 1 else ""
    print(f"bits/dim: {res.bpd:.4f} +- {res.bpd_stderr:.4f} (standard error) over {res.num_examples} examples, "
          f"{res.vb_per_t.size} timesteps, {res.seconds:.1f} s{procs}")
    print(f"  prior term (t=T):    {res.prior_bpd:.6f}")
    print(f"  decoder term (t=0):  {res.decoder_bpd:.4f}")
    print(f"  sum of vb terms:     {res.vb_sum:.4f}  (includes the decoder term)")
    print(f"wrote per-timestep terms (ascending t) to {given_out(args)}")
    return 0


def given_out(args: argparse.Namespace) -> str:
    return getattr(args, "out", NLLConfig.out)
