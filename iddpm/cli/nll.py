"""``iddpm nll``: exact negative log-likelihood in bits/dim (the original's ``image_nll.py`` / ``calc_bpd_loop``).

Prints the mean bits/dim with its standard error and the breakdown (prior term, t = 0 decoder term, sum of
the per-step terms) and writes the per-timestep terms (ascending t) to ``--out`` (.csv, .npz or .json).
"""

from __future__ import annotations

import argparse
import time

from iddpm.cli.args import str2bool
from iddpm.cli.sample import add_model_source_flags, load_for_sampling
from iddpm.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_source_flags(parser)
    g = parser.add_argument_group("evaluation data")
    g.add_argument("--data_dir", dest="nll_data_dir", default=None,
                   help="image folder, .npz or 'digits' (default: the run's data; for digits the test split)")
    g.add_argument("--split", default="test", choices=("train", "test", "all"),
                   help="digits split (default test; ignored for folders / npz)")
    g.add_argument("--batch_size", type=int, default=64)
    g.add_argument("--num_examples", type=int, default=None, help="evaluate only the first N examples")
    g.add_argument("--clip_denoised", type=str2bool, nargs="?", const=True, default=True, metavar="BOOL")
    g.add_argument("--seed", type=int, default=0, help="example i's noise comes from (seed, i)")
    g.add_argument("--out", default="nll.csv", help="per-timestep terms: .csv (+ .json summary), .npz or .json")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Under ``torchrun`` every process evaluates every world_size-th batch; rank 0 merges and reports."""
    from iddpm.api import nll_loader
    from iddpm.eval.nll import compute_nll_share, merge_nll_shares, save_nll
    from iddpm.runtime.distributed import init_distributed

    if args.batch_size < 1:
        raise ConfigError(f"--batch_size {args.batch_size}: must be >= 1")
    if args.num_examples is not None and args.num_examples < 1:
        raise ConfigError(f"--num_examples {args.num_examples}: must be >= 1")
    if not str(args.out).lower().endswith((".csv", ".npz", ".json")):
        raise ConfigError(f"--out {args.out}: use a .csv, .npz or .json file name")
    ctx = init_distributed(args.device)
    try:
        model, diffusion, cfg, device = load_for_sampling(args, device=str(ctx.device), verbose=ctx.is_main)
        if cfg.model.super_res:
            raise ConfigError(f"--run {args.run}: NLL of super-resolution models is not supported "
                              "(needs low_res inputs)")
        data_dir = args.nll_data_dir
        source = data_dir if data_dir is not None else (cfg.data.data_dir or "digits")
        if ctx.is_main and source in ("", "digits"):
            print(f"data: bundled digits, {args.split} split")
        elif ctx.is_main:
            print(f"data: {source}" + ("" if data_dir is not None else " (the run's training data; pass --data_dir "
                                                                           "for held-out images)"))
        loader = nll_loader(cfg, data_dir=data_dir, split=args.split, batch_size=args.batch_size)
        start = time.perf_counter()
        share = compute_nll_share(model, diffusion, loader, clip_denoised=args.clip_denoised, device=device,
                                  progress=not args.quiet and ctx.is_main, seed=args.seed,
                                  max_examples=args.num_examples, use_labels=cfg.model.class_cond,
                                  rank=ctx.rank, world_size=ctx.world_size)
        shares = ctx.all_gather_object(share)
        elapsed = time.perf_counter() - start
    finally:
        ctx.shutdown()
    if not ctx.is_main:
        return 0
    res = merge_nll_shares(shares, diffusion)
    procs = f", {ctx.world_size} processes" if ctx.world_size > 1 else ""
    print(f"bits/dim: {res.bpd:.4f} +- {res.bpd_stderr:.4f} (standard error) over {res.num_examples} examples, "
          f"{res.vb_per_t.size} timesteps, {elapsed:.1f} s{procs}")
    print(f"  prior term (t=T):    {res.prior_bpd:.6f}")
    print(f"  decoder term (t=0):  {res.decoder_bpd:.4f}")
    print(f"  sum of vb terms:     {res.vb_sum:.4f}  (includes the decoder term)")
    path = save_nll(res, args.out)
    print(f"wrote per-timestep terms (ascending t) to {path}")
    return 0
