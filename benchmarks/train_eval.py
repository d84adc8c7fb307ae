"""Sample quality measured while training (issue 14): FID against training steps and wall time, and its cost.

Usage::

    python benchmarks/train_eval.py                    # 15 minutes of training, one torch thread
    python benchmarks/train_eval.py --minutes 10 --eval_samples 500 --eval_every 300

Trains the ``iddpm demo`` model (the digits preset with the demo's overrides: 32 channels, lr 1e-3, EMA 0.995,
T = 250; batch 64) for ``--minutes`` of *training* -- the periodic evaluation's time is kept out of the budget --
with ``--eval_every`` N steps (and at the end): ``--eval_samples`` K images, ``--eval_steps`` ancestral steps,
digit-FID (digits-CNN features) with its bootstrap standard error, KID, precision and recall against the 360
test digits.  Writes ``--out`` (default ``benchmarks/results/train_eval/``):

* ``eval.csv``: the run's evaluation rows (a copy);
* ``report.png``: ``iddpm plot`` of the run (losses, FID vs step, the last samples);
* ``fid_curve.png``: FID against step and against wall-clock minutes;
* ``summary.md``: the settings, the machine, the table and the cost of evaluation as a share of the run.

Wall time of a row = seconds since the run started (model building and the reference statistics included);
training time = wall time less the evaluations before it and the set-up (what ``--max_minutes`` counts).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from iddpm import api
from iddpm.cli.demo import demo_base_config
from iddpm.eval.report import read_eval_csv

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "train_eval"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=15.0, help="training budget (evaluation excluded)")
    p.add_argument("--eval_every", type=int, default=300)
    p.add_argument("--eval_samples", type=int, default=500)
    p.add_argument("--eval_steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the CPU is shared)")
    p.add_argument("--run_dir", default="runs/bench_train_eval", help="the run (replaced)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    return p.parse_args()


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)"


def _rows(run_dir: Path, t_start: float, setup_s: float) -> list[dict]:
    """eval.csv rows as numbers, with ``wall_min`` (since the start) and ``train_min`` (training time so far)."""
    out, eval_so_far = [], 0.0
    for r in read_eval_csv(run_dir / "eval.csv"):
        row = {k: float(r[k]) if r[k] not in ("", None) else float("nan") for k in r if k not in ("sampler",)}
        eval_so_far += row["seconds"]
        wall = row["wall_time"] - t_start
        row.update(wall_min=wall / 60, train_min=max(0.0, wall - setup_s - eval_so_far) / 60)
        out.append(row)
    return out


def _curve(rows: list[dict], path: Path) -> None:
    """FID (+-1 s.e.) against step and against wall-clock minutes."""
    from matplotlib import ticker  # why: optional (iddpm[plots]), slow to import
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "step", "optimizer step"), (axes[1], "wall_min", "wall-clock minutes")):
        ax.errorbar([r[key] for r in rows], [r["fid"] for r in rows], yerr=[r["fid_se"] for r in rows], fmt="o-",
                    ms=3, capsize=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax.set_xlabel(label)
        ax.set_ylabel("digit-FID vs the 360 test digits")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"FID while training the demo model ({int(rows[-1]['num_samples'])} samples, "
                 f"{int(rows[-1]['steps'])} ancestral steps; error bars: bootstrap s.e.)")
    fig.savefig(path)


def _summary(args, rows: list[dict], result, total_s: float, setup_s: float, load: tuple, cfg) -> str:
    train_s, eval_s = result.seconds - result.eval_seconds, result.eval_seconds
    lines = [
        "# FID measured while training (benchmarks/train_eval.py)", "",
        f"Machine: {_machine()}; shared with other jobs (load average {load[0]:.1f} at the start, {load[1]:.1f} at "
        "the end).",
        f"Run: the `iddpm demo` model (digits preset, {cfg.model.num_channels} channels, T = "
        f"{cfg.diffusion.diffusion_steps}, batch {cfg.train.batch_size}, lr {cfg.train.lr:g}, EMA "
        f"{cfg.train.ema_rate}), `--max_minutes {args.minutes:g}` of training; `--eval_every {args.eval_every} "
        f"--eval_samples {args.eval_samples} --eval_steps {args.eval_steps}` (ancestral) against digits-test "
        "(digits-CNN features; FID s.e. = bootstrap over the samples, 20 resamples).", "",
        "| step | training min | wall min | digit-FID | +- s.e. | KID | precision | recall | eval s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {int(r['step'])} | {r['train_min']:.1f} | {r['wall_min']:.1f} | {r['fid']:.3f} | "
                     f"{r['fid_se']:.3f} | {r['kid']:.4f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['seconds']:.1f} |")
    best = min(rows, key=lambda r: r["fid"])
    lines += [
        "",
        f"Steps: {result.step} ({result.step * cfg.train.batch_size} images, {result.images_per_second:.0f} img/s "
        f"while training); stop: {result.stop_reason}; best digit-FID {best['fid']:.3f} +- {best['fid_se']:.3f} at "
        f"step {int(best['step'])} (kept in checkpoints/best_ema_{cfg.train.ema_rates[0]}/).",
        f"Time: {total_s / 60:.1f} min in all = set-up {setup_s:.0f} s (model, reference statistics) + training "
        f"{train_s:.0f} s + evaluation {eval_s:.0f} s ({len(rows)} evaluations, {eval_s / max(len(rows), 1):.1f} s "
        f"each).  Evaluation = {100 * eval_s / (train_s + eval_s):.1f}% of the run (training + evaluation), "
        f"{100 * eval_s / train_s:.1f}% on top of the training budget.",
        "", "Files: eval.csv (the run's rows), fid_curve.png (FID vs step and wall time), report.png (`iddpm plot`).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    args = _args()
    torch.set_num_threads(args.threads)
    run_dir, out = Path(args.run_dir), Path(args.out)
    shutil.rmtree(run_dir, ignore_errors=True)  # the benchmark's own run
    out.mkdir(parents=True, exist_ok=True)
    base = demo_base_config()
    cfg = base.replace(train=dataclasses.replace(
        base.train, run_dir=str(run_dir), max_minutes=args.minutes, eval_every=args.eval_every,
        eval_samples=args.eval_samples, eval_steps=args.eval_steps, eval_ref="digits-test", keep_best=True))
    load0 = os.getloadavg()[0]
    t_start = time.time()
    result = api.train(cfg, progress=False)
    total_s = time.time() - t_start
    setup_s = total_s - result.seconds  # building the run and its reference statistics (before the loop)
    rows = _rows(run_dir, t_start, setup_s)
    shutil.copyfile(run_dir / "eval.csv", out / "eval.csv")
    api.plot_run(run_dir, out / "report.png")
    _curve(rows, out / "fid_curve.png")
    text = _summary(args, rows, result, total_s, setup_s, (load0, os.getloadavg()[0]), cfg)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
