"""``iddpm demo``: train the ``digits`` preset on the bundled 8x8 digits for a few minutes on the CPU, then write
a sample grid and print the test-split NLL in bits/dim and the samples' digit-FID.

The model is unconditional (the preset's ``class_cond=False``); with ``--class_cond True`` it is trained with
label dropout 0.1 (``--class_dropout``, unless given) and the grid (each row the digits 0-9) is sampled with
classifier-free guidance W = :data:`DEMO_GUIDANCE`.  On top of the preset the demo uses
:data:`DEMO_OVERRIDES`, chosen for a few minutes of CPU training: a narrower U-Net (32 channels: ~3x the
images/s of 64), a higher learning rate, an EMA rate whose average forgets the random initial weights
within ~1000 steps (0.999 would still hold ~37% of them after 1000 steps), and T = 250 so that the exact
NLL of the whole test split takes about a minute.  Any training flag overrides these, e.g.
``iddpm demo --minutes 10 --class_cond True``.  The sample grid is drawn with :data:`DEMO_SAMPLER`
(DPM-Solver++ 2M) on the uniform step grid in ``--sample_steps`` (default 20) model evaluations, the best few-step
sampler measured on this model by ``benchmarks/samplers.py``.
Every 300 steps (and at the end) the training measures the
digit-FID of 200 samples (25 ancestral steps) against the test digits (``--eval_every``, see
:mod:`iddpm.train.evaluation`; ``RUN_DIR/eval.csv``); the sample-quality line is that final evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

import torch

from iddpm import api
from iddpm.build import guidance_capable
from iddpm.checkpoints.run_dir import read_config
from iddpm.cli.args import add_config_flags, resolve_run_config
from iddpm.config import ConfigError, apply_overrides, preset
from iddpm.data.digits import load_digits_split
from iddpm.eval.report import read_eval_csv
from iddpm.sample import save_grid, save_npz

DEMO_RUN_DIR = "runs/demo"
DEMO_OVERRIDES = dict(num_channels=32, lr=1e-3, ema_rate="0.995", diffusion_steps=250)
# --class_cond True: label dropout and guidance scale W of the grid.  W = 1.5 raises the class accuracy of the
# samples (digits CNN) from ~98.6% to ~99.7% at about the same digit-FID; from W = 2 on FID and recall get clearly
# worse (benchmarks/guidance.py, table in benchmarks/results/guidance/table.md).
DEMO_CLASS_DROPOUT = 0.1
DEMO_GUIDANCE = 1.5
# The grid's sampler, step grid and steps (= NFE): measured on the demo's model (benchmarks/samplers.py, table in
# benchmarks/results/samplers/table.md), DPM-Solver++(2M) on the uniform-in-t grid was the best sampler at 5-10 NFE
# and stays within a few hundredths of the best digit-FID above (the solver's default logsnr grid wastes steps on
# the cosine schedule's extreme log-SNR ends: 5x worse at 5 NFE), so --sample_steps may be lowered safely.
DEMO_SAMPLER = "dpm++2m"
DEMO_SCHEDULE = "uniform"
DEMO_SAMPLE_STEPS = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=5.0,
                        help="training time budget in minutes (default 5; the periodic FID, sampling and NLL take "
                             "1-2 more)")
    parser.add_argument("--num_samples", type=int, default=100, help="images in the sample grid (default 100)")
    parser.add_argument("--sample_steps", type=int, default=DEMO_SAMPLE_STEPS,
                        help=f"sampling steps = model evaluations per image of the grid, with the {DEMO_SAMPLER} "
                             f"solver (default {DEMO_SAMPLE_STEPS}; at most T)")
    parser.add_argument("--nll_examples", type=int, default=0,
                        help="test images for the NLL (default 0 = the whole test split, 360 images)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: this tiny model gains little from more, and on a shared CPU "
                             "extra threads cost a lot)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    add_config_flags(parser, shown=demo_base_config())


def demo_base_config():
    """The digits preset with :data:`DEMO_OVERRIDES` and the demo's run settings (before command-line flags)."""
    base = apply_overrides(preset("digits"), DEMO_OVERRIDES, source="demo")
    return base.replace(train=dataclasses.replace(base.train, run_dir=DEMO_RUN_DIR, save_interval=0,
                                                  log_interval=100, sample_every=0, eval_every=300,
                                                  eval_samples=200, eval_steps=25, eval_ref="digits-test"))


def _fit_eval(cfg):
    """The demo's periodic FID fitted to the run: at most T sampling steps, and off for images other than the 8x8
    grayscale digits that its digits-test reference holds."""
    tc, m = cfg.train, cfg.model
    off = (m.image_size, m.in_channels) != (8, 1) and tc.eval_ref == "digits-test"
    tc = dataclasses.replace(tc, eval_every=0 if off else tc.eval_every, keep_best=tc.keep_best and not off,
                             eval_steps=min(tc.eval_steps, cfg.diffusion.diffusion_steps))
    return cfg.replace(train=tc)


def _quality(cfg, run_dir: Path, n_test: int | None) -> str:
    """The final evaluation of the first EMA rate (the last row of ``eval.csv``) in words ("" without one)."""
    rows = [r for r in read_eval_csv(run_dir / "eval.csv") if float(r["ema_rate"]) == cfg.train.ema_rates[0]]
    if not rows:
        return ""
    q, ref = rows[-1], cfg.train.eval_ref
    name = "digit-FID" if (cfg.model.image_size, cfg.model.in_channels) == (8, 1) else "FID"
    vs = f"the {n_test} test digits" if ref == "digits-test" and n_test else (ref or "the training data")
    f = {k: float(q[k] or "nan") for k in ("fid", "fid_se", "precision", "recall")}  # "" = not computed
    return (f"{name} {f['fid']:.2f} +- {f['fid_se']:.2f} vs {vs} ({q['num_samples']} samples, {q['sampler']} "
            f"{q['steps']} steps, at step {q['step']}; every evaluation in {run_dir / 'eval.csv'}), "
            f"precision {f['precision']:.2f}, recall {f['recall']:.2f}")


def _fresh_run_dir(run_dir: Path) -> None:
    """Reuse ``run_dir`` only if it is empty or an earlier demo (whose outputs are replaced)."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    try:
        earlier = read_config(run_dir).preset == "digits"
    except ConfigError:
        earlier = False
    if not earlier:
        raise ConfigError(f"--run_dir {run_dir}: exists and is not an earlier demo run; choose another --run_dir")
    for name in ("checkpoints", "tb", "samples"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    # config.json too: the new demo writes its own (training refuses a folder holding another run's config)
    for name in ("config.json", "metrics.csv", "samples.png", "samples.npz", "nll.json"):
        (run_dir / name).unlink(missing_ok=True)


def _with_label_dropout(cfg, args: argparse.Namespace):
    """A class-conditional demo trains with :data:`DEMO_CLASS_DROPOUT` unless ``--class_dropout`` was given."""
    if not cfg.model.class_cond or "class_dropout" in vars(args):
        return cfg
    return cfg.replace(model=dataclasses.replace(cfg.model, class_dropout=DEMO_CLASS_DROPOUT)).validate()


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    if args.minutes <= 0:
        raise ConfigError(f"--minutes {args.minutes}: must be > 0")
    base = demo_base_config()
    base = base.replace(train=dataclasses.replace(base.train, max_minutes=args.minutes))
    cfg = _fit_eval(resolve_run_config(args, base=base))
    cfg = _with_label_dropout(cfg, args)
    guidance = DEMO_GUIDANCE if guidance_capable(cfg) else 1.0
    run_dir = Path(cfg.train.run_dir)
    _fresh_run_dir(run_dir)
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # a process setting: the demo is the whole process
    m = cfg.model
    cond = "class-conditional" if m.class_cond else "unconditional"
    print(f"iddpm demo: training an {cond} {m.image_size}x{m.image_size} model on the bundled digits for "
          f"{cfg.train.max_minutes:g} min (run dir {run_dir})", file=sys.stderr)
    result = api.train(cfg, progress=not args.no_progress)
    t_train = time.perf_counter() - t_start
    t_eval = result.eval_seconds
    print(f"iddpm demo: {result.step} steps ({result.step * cfg.train.batch_size} images) in "
          f"{result.seconds - t_eval:.0f} s, {result.images_per_second:.0f} img/s (+ {t_eval:.0f} s measuring FID)",
          file=sys.stderr)

    steps = min(args.sample_steps, cfg.diffusion.diffusion_steps)
    samples = api.sample(run_dir, num_samples=args.num_samples, batch_size=args.num_samples, seed=cfg.train.seed,
                         sampler=DEMO_SAMPLER, steps=steps, schedule=DEMO_SCHEDULE,
                         classes="balanced" if m.class_cond else None,
                         guidance_scale=guidance, device=cfg.train.device, progress=not args.no_progress)
    grid = save_grid(samples.images, run_dir / "samples.png", nrow=10)
    save_npz(run_dir / "samples.npz", samples.images, samples.labels)
    t_sample = time.perf_counter() - t_start - t_train

    n_test = len(load_digits_split("test")[0]) if cfg.data.data_dir in ("", "digits") else None
    quality = _quality(cfg, run_dir, n_test)
    n_eval = args.nll_examples if args.nll_examples > 0 else (n_test or 0)
    nll = api.nll(run_dir, split="test", batch_size=min(n_eval, 120) if n_eval else 120, num_examples=n_eval,
                  seed=cfg.train.seed, device=cfg.train.device, out=str(run_dir / "nll.json"), save=True,
                  progress=not args.no_progress)
    t_nll = time.perf_counter() - t_start - t_train - t_sample
    total = time.perf_counter() - t_start

    which = "the whole test split" if nll.num_examples == n_test else \
        f"a subset: the first {nll.num_examples} of {n_test} test images"
    print(f"samples: {grid} ({args.num_samples} images, {steps} sampling steps: {DEMO_SAMPLER} on the "
          f"{samples.info['schedule']} grid, NFE {samples.nfe}; EMA {cfg.train.ema_rates[0]})")
    if guidance != 1.0:
        print(f"classifier-free guidance: W = {guidance:g} (label dropout {m.class_dropout:g}); each grid row holds "
              "the digits 0-9")
    if quality:
        print(f"sample quality: {quality}")
    print(f"test NLL: {nll.bpd:.3f} +- {nll.bpd_stderr:.3f} bits/dim over {which} "
          f"(T = {cfg.diffusion.diffusion_steps}, {cond})")
    print(f"time: {total / 60:.1f} min (train {t_train - t_eval:.0f} s, FID {t_eval:.0f} s, sample {t_sample:.0f} s, "
          f"nll {t_nll:.0f} s); "
          f"checkpoint {result.last_checkpoint}")
    return 0
