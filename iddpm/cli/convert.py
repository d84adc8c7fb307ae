"""``iddpm convert-openai FILE.pt --preset NAME [-o OUT.safetensors] [model/diffusion flags]``.

Reads an improved-diffusion checkpoint safely (``torch.load(weights_only=True)``), checks it against
the model of the preset/flags (a mismatch names the keys and the preset that fits) and writes iddpm's
model file (safetensors + the full config in its metadata), which ``iddpm sample`` / ``nll`` load alone.
Without ``--preset`` (and ``--config``) the preset is taken from a released file name or from the one
preset whose layout fits; otherwise the model flags alone describe the model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from iddpm.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from iddpm.cli.args import add_config_flags, add_run_flags

    parser.add_argument("checkpoint", help="improved-diffusion .pt file (e.g. cifar10_uncond_50M_500K.pt)")
    parser.add_argument("-o", "--output", default=None,
                        help="output .safetensors file (default: the input path with suffix .safetensors)")
    parser.add_argument("--sidecar", action="store_true", help="also write config.json beside the output")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    add_run_flags(parser)
    add_config_flags(parser, sections=("model", "diffusion"))


def run(args: argparse.Namespace) -> int:
    from iddpm.checkpoints.model_file import save_model_file
    from iddpm.checkpoints.openai import check_state_dict, guess_preset, load_openai_state_dict
    from iddpm.cli.args import resolve_run_config

    src = Path(args.checkpoint)
    state_dict = load_openai_state_dict(src)
    if not getattr(args, "preset", None) and not getattr(args, "config", None):
        guessed = guess_preset(src, state_dict)
        if guessed is not None:
            args.preset = guessed
            print(f"using --preset {guessed}")
    cfg = resolve_run_config(args)
    if getattr(args, "dry_run", False):
        print(cfg.to_json())
        return 0
    check_state_dict(state_dict, cfg, source=str(src))
    out = Path(args.output) if args.output else src.with_suffix(".safetensors")
    if out.resolve() == src.resolve():
        raise ConfigError(f"-o {out}: would overwrite the input; choose another output path")
    if out.exists() and not args.force:
        raise ConfigError(f"-o {out}: file exists; pass --force to overwrite or choose another path")
    state_dict = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}
    save_model_file(out, state_dict, cfg, extra_metadata={"source": src.name, "converted_by": "iddpm convert-openai"},
                    sidecar=args.sidecar)
    n_params = sum(v.numel() for v in state_dict.values())
    print(f"wrote {out} ({len(state_dict)} tensors, {n_params:,} parameters, preset {cfg.preset or '(flags)'})")
    return 0
