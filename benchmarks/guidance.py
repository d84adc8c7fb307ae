"""What classifier-free guidance buys on the bundled 8x8 digits: class accuracy, digit-FID, precision, recall vs W.

Usage::

    python benchmarks/guidance.py            # the full benchmark: ~50 min on a shared 2-core CPU, 1 thread
                                             # (17 min training, 33 min sampling; a cached model: the latter)
    python benchmarks/guidance.py --quick --out /tmp/g   # seconds: same stages, tiny budget (the smoke test)

The model: ``iddpm demo``'s settings (:func:`iddpm.cli.demo.demo_base_config`: the digits preset with a 32-wide
U-Net, T = 250, lr 1e-3, EMA 0.995, batch 64) made class-conditional (``class_cond``, 10 classes) with label
dropout 0.1, trained by :func:`iddpm.api.train` for a fixed number of optimizer steps (default 1830: what the demo's
5-minute budget reaches on an idle machine, see the README; counted in steps so that the model does not depend on
the machine's load).  The run directory is cached in ``OUT/run`` and reused when it holds that budget's final
checkpoint with the same settings (``--retrain`` starts afresh).

For each guidance scale W (default 0, 1, 1.5, 2, 3, 5), each sampler (ancestral with 50-step respacing; DDIM,
eta 0, ``ddim50``) and each seed (default 3), :func:`iddpm.api.sample` draws ``--num_samples`` class-balanced
samples (labels 0..9 in turn) from the EMA weights, and the benchmark measures

* class accuracy: the fraction whose class, as predicted by the shipped digits CNN
  (:mod:`iddpm.eval.digits_classifier`, 99.7% on the real test digits), is the requested one;
* digit-FID, precision and recall (k = 3) against the 360 test digits (:func:`iddpm.api.evaluate`,
  ``"digits-test"``, the CNN's 64-d features).

Numbers are means over seeds with standard errors (std / sqrt(seeds)).  The seeds are shared across W (sample i
of a seed starts from the same noise whatever W), so differences between scales are paired: ``d_fid`` is the mean
per-seed change of FID from W = 1, with its own (paired) standard error.  For reference the table also shows the
real train split measured the same way against the test split.  Torch runs with ``--threads`` intra-op threads.

Outputs in ``--out`` (default ``benchmarks/results/guidance``): ``results.json`` (machine, command, settings,
training, every per-seed number), ``table.md``, ``guidance.png`` (accuracy, FID, precision, recall vs W) and
``samples.png`` (per W, two samples of each digit 0-9, ancestral sampler, first seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from speed import cpu_model, load_average  # benchmarks/ is the script's folder (sys.path[0])

from iddpm import api
from iddpm.checkpoints.run_dir import list_checkpoints, read_config
from iddpm.cli.demo import demo_base_config
from iddpm.config import apply_overrides
from iddpm.data.digits import load_digits_split
from iddpm.eval.digits_classifier import accuracy, load_digits_classifier
from iddpm.runtime.atomic import atomic_write_text
from iddpm.sample import save_grid

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "guidance"
MODES = {  # optimizer steps, seeds, samples per (sampler, W, seed), sampling steps, scales
    "full": dict(train_steps=1830, seeds=3, num_samples=500, sample_steps=50, scales=(0.0, 1.0, 1.5, 2.0, 3.0, 5.0)),
    "quick": dict(train_steps=4, seeds=2, num_samples=20, sample_steps=4, scales=(0.0, 1.0, 3.0)),
}
SAMPLERS = ("ancestral", "ddim")
MODEL_SETTINGS = dict(class_cond=True, num_classes=10, class_dropout=0.1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default benchmarks/results/guidance)")
    p.add_argument("--quick", action="store_true", help="tiny budget: a smoke test of every stage (seconds)")
    p.add_argument("--train_steps", type=int, help="optimizer steps of the model (default 1830; quick 4)")
    p.add_argument("--seeds", type=int, help="sampling seeds per (sampler, W) (default 3)")
    p.add_argument("--num_samples", type=int, help="class-balanced samples per seed (default 500)")
    p.add_argument("--sample_steps", type=int, help="respaced sampling steps (default 50)")
    p.add_argument("--scales", help="comma list of guidance scales W (default 0,1,1.5,2,3,5)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--retrain", action="store_true", help="delete OUT/run and train again")
    args = p.parse_args(argv)
    mode = MODES["quick" if args.quick else "full"]
    for key, value in mode.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if isinstance(args.scales, str):
        args.scales = tuple(float(s) for s in args.scales.split(",") if s.strip())
    if 1.0 not in args.scales:
        p.error("--scales must include 1 (the unguided baseline the paired differences refer to)")
    return args


# --------------------------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------------------------
def model_config(run_dir: Path, train_steps: int):
    """The demo's config, class-conditional with label dropout 0.1, for ``train_steps`` steps into ``run_dir``."""
    cfg = apply_overrides(demo_base_config(), dict(MODEL_SETTINGS, max_steps=train_steps, run_dir=str(run_dir)))
    train = dataclasses.replace(cfg.train, max_minutes=0.0)
    if getattr(train, "eval_every", 0):  # the demo's FID during training: measured here after training instead
        train = dataclasses.replace(train, eval_every=0)
    return cfg.replace(train=train).validate()


def _same_model(a, b) -> bool:
    """Same model, diffusion, data and training maths (run bookkeeping such as the run directory may differ)."""
    keep = ("lr", "batch_size", "ema_rate", "seed", "max_steps", "weight_decay", "schedule_sampler", "precision")
    return (a.model, a.diffusion, a.data) == (b.model, b.diffusion, b.data) and \
        all(getattr(a.train, k) == getattr(b.train, k) for k in keep)


def trained_run(run_dir: Path, train_steps: int, retrain: bool, log) -> dict:
    """Train (or reuse) the benchmark's model in ``run_dir``; returns what the training reports."""
    cfg = model_config(run_dir, train_steps)
    if retrain and run_dir.exists():
        shutil.rmtree(run_dir)
    if run_dir.exists():
        steps = [s for s, _ in list_checkpoints(run_dir)]
        if steps and steps[-1] == train_steps and _same_model(read_config(run_dir), cfg):
            log(f"reusing {run_dir} (step {train_steps})")
            info_file = run_dir / "benchmark_training.json"
            return json.loads(info_file.read_text()) if info_file.is_file() else {"step": train_steps, "reused": True}
        raise SystemExit(f"{run_dir}: holds another run (steps {steps[-1:] or 'none'}); pass --retrain to replace it")
    log(f"training {train_steps} steps into {run_dir}")
    result = api.train(cfg, progress=False)
    info = {"step": result.step, "seconds": round(result.seconds, 1), "img_per_s": round(result.images_per_second, 1),
            "stop_reason": result.stop_reason, "checkpoint": str(result.last_checkpoint),
            "load_average": load_average()}
    atomic_write_text(run_dir / "benchmark_training.json", json.dumps(info, indent=2) + "\n")
    return info


# --------------------------------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------------------------------
def measure(images: np.ndarray, labels: np.ndarray, classifier) -> dict:
    """uint8 [N, 8, 8, 1] images with their requested labels [N] -> accuracy, fid, precision, recall."""
    q = api.evaluate(images, "digits-test", metrics=("fid", "pr"))
    return {"accuracy": accuracy(classifier, images, labels), "fid": float(q["fid"]),
            "precision": float(q["precision"]), "recall": float(q["recall"])}


def sample_grid_rows(result, per_class: int = 2) -> np.ndarray:
    """``per_class`` samples of each class 0..9 in class order (uint8 [10 * per_class, H, W, C])."""
    picks = [np.flatnonzero(result.labels == k)[:per_class] for k in range(10)]
    return result.images[np.concatenate(picks)]


def run_sampling(run_dir: Path, args, classifier, log) -> tuple[list[dict], np.ndarray]:
    """Every (sampler, W, seed): one row of measurements; plus the ancestral first-seed grid rows (one per W)."""
    rows, grid = [], []
    for sampler in SAMPLERS:
        respacing = f"ddim{args.sample_steps}" if sampler == "ddim" else str(args.sample_steps)
        model, diffusion, cfg = api.load_run(run_dir, timestep_respacing=respacing, device="cpu")  # EMA weights
        for w in args.scales:
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                res = api.sample(model=model, diffusion=diffusion, cfg=cfg, num_samples=args.num_samples,
                                 batch_size=args.num_samples, seed=seed, classes="balanced",
                                 use_ddim=sampler == "ddim", guidance_scale=w)
                seconds = time.perf_counter() - t0
                row = {"sampler": sampler, "W": w, "seed": seed, "num_samples": args.num_samples,
                       "seconds": round(seconds, 2),
                       **measure(res.images, res.labels, classifier)}
                rows.append(row)
                log(f"{sampler:9s} W={w:<4g} seed {seed}: acc {row['accuracy']:.3f} fid {row['fid']:.3f} "
                    f"P {row['precision']:.3f} R {row['recall']:.3f} ({seconds:.0f} s)")
                if sampler == "ancestral" and seed == 0:
                    grid.append(sample_grid_rows(res))
    return rows, np.concatenate(grid)


def real_reference(classifier) -> dict:
    """The real train split measured like the samples (accuracy of the CNN, FID/P/R against the test split)."""
    x, y = load_digits_split("train")
    return measure(x[..., None], y, classifier) | {"num_images": int(len(x))}


# --------------------------------------------------------------------------------------------------------------------
# statistics and verdict
# --------------------------------------------------------------------------------------------------------------------
METRICS = ("accuracy", "fid", "precision", "recall")


def _mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def summarise(rows: list[dict]) -> list[dict]:
    """Per (sampler, W): mean and s.e. of every metric, and the paired change from W = 1 of accuracy and FID."""
    out = []
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        mine = [r for r in rows if r["sampler"] == sampler]
        base = {r["seed"]: r for r in mine if r["W"] == 1.0}
        for w in dict.fromkeys(r["W"] for r in mine):
            at = sorted((r for r in mine if r["W"] == w), key=lambda r: r["seed"])
            s = {"sampler": sampler, "W": w, "seeds": len(at),
                 "seconds_per_1000": 1000 * float(np.mean([r["seconds"] / r["num_samples"] for r in at]))}
            for m in METRICS:
                s[m], s[f"{m}_se"] = _mean_se([r[m] for r in at])
            for m in ("accuracy", "fid"):
                s[f"d_{m}"], s[f"d_{m}_se"] = _mean_se([r[m] - base[r["seed"]][m] for r in at])
            out.append(s)
    return out


def _paired(rows: list[dict], sampler: str, metric: str, w: float, ref: float) -> tuple[float, float]:
    """Mean and s.e. over seeds of ``metric`` at W = ``w`` minus at W = ``ref`` (same seeds, same noise)."""
    at = {r["seed"]: r[metric] for r in rows if r["sampler"] == sampler and r["W"] == ref}
    return _mean_se([r[metric] - at[r["seed"]] for r in rows if r["sampler"] == sampler and r["W"] == w])


def _clearly_above(d: float, se: float) -> bool:
    """A paired difference ``d`` larger than 2 of its standard errors (any positive one with a single seed)."""
    return d > 2 * se if math.isfinite(se) else d > 0


def verdict(summary: list[dict], rows: list[dict]) -> list[str]:
    """Plain sentences per sampler: the W of the best FID, where the accuracy stops rising (the smallest W not
    clearly below the best accuracy) and from which larger W the FID is clearly worse than its best (paired, 2 s.e.)."""
    lines = []
    for sampler in dict.fromkeys(s["sampler"] for s in summary):
        mine = sorted((s for s in summary if s["sampler"] == sampler), key=lambda s: s["W"])
        best, top = min(mine, key=lambda s: s["fid"]), max(mine, key=lambda s: s["accuracy"])
        plateau = next(s for s in mine
                       if not _clearly_above(*_paired(rows, sampler, "accuracy", top["W"], s["W"])))
        worse = [s for s in mine if s["W"] > best["W"] and _clearly_above(*_paired(rows, sampler, "fid", s["W"],
                                                                                     best["W"]))]
        fid1 = next(s["fid"] for s in mine if s["W"] == 1.0)
        text = (f"{sampler}: digit-FID is lowest at W = {best['W']:g} ({best['fid']:.3f} ± {best['fid_se']:.3f}; "
                f"W = 1: {fid1:.3f}); class accuracy stops rising at W = {plateau['W']:g} ({plateau['accuracy']:.3f}; "
                f"highest {top['accuracy']:.3f} at W = {top['W']:g})")
        if worse:
            text += f"; FID is clearly worse than its best from W = {worse[0]['W']:g} ({worse[0]['fid']:.3f}) on"
        lines.append(text + ".")
    return lines


# --------------------------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------------------------
def _pm(v: float, se: float, digits: int = 3) -> str:
    return f"{v:.{digits}f} ± {se:.{digits}f}" if math.isfinite(se) else f"{v:.{digits}f}"


def table_md(summary: list[dict], real: dict, lines: list[str], settings: dict, machine: dict) -> str:
    head = ("| sampler | W | class accuracy | digit-FID | ΔFID vs W=1 (paired) | precision | recall | s / 1000 |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {s['sampler']} | {s['W']:g} | {_pm(s['accuracy'], s['accuracy_se'])} | {_pm(s['fid'], s['fid_se'])} | "
        f"{_pm(s['d_fid'], s['d_fid_se'])} | {_pm(s['precision'], s['precision_se'])} | "
        f"{_pm(s['recall'], s['recall_se'])} | {s['seconds_per_1000']:.0f} |\n" for s in summary)
    body += (f"| real train split ({real['num_images']}) | – | {real['accuracy']:.3f} | {real['fid']:.3f} | – | "
             f"{real['precision']:.3f} | {real['recall']:.3f} | – |\n")
    intro = (f"Classifier-free guidance on the digits: {settings['train_steps']} training steps, "
             f"{settings['seeds']} seeds x {settings['num_samples']} class-balanced samples per (sampler, W), "
             f"{settings['sample_steps']} sampling steps; mean ± standard error over seeds. FID, precision and "
             f"recall against the 360 test digits (digits-CNN features). Machine: {machine['cpu']}, "
             f"{machine['cores']} cores (shared), {machine['torch_threads']} torch thread(s).\n\n")
    rows = ", ".join(f"{w:g}" for w in settings["scales"])
    tail = (f"\n`guidance.png`: the four metrics vs W. `samples.png`: one row per W (top to bottom {rows}), two "
            "samples of each digit 0-9 (ancestral, first seed).\n")
    return intro + head + body + "\n" + "\n".join(f"- {s}" for s in lines) + "\n" + tail


def plot(summary: list[dict], real: dict, path: Path) -> None:
    plt.switch_backend("agg")  # files only, whatever display the machine has
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, m, label in zip(axes, METRICS, ("class accuracy", "digit-FID (lower is better)", "precision", "recall"),
                            strict=True):
        for sampler in dict.fromkeys(s["sampler"] for s in summary):
            mine = sorted((s for s in summary if s["sampler"] == sampler), key=lambda s: s["W"])
            ax.errorbar([s["W"] for s in mine], [s[m] for s in mine], yerr=[s[f"{m}_se"] for s in mine],
                        marker="o", capsize=3, label=sampler)
        ax.axhline(real[m], color="gray", ls="--", lw=1, label="real train split")
        ax.set_xlabel("guidance scale W")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)

    training = trained_run(out / "run", args.train_steps, args.retrain, log)
    classifier, _ = load_digits_classifier()
    rows, grid = run_sampling(out / "run", args, classifier, log)
    summary, real = summarise(rows), real_reference(classifier)
    lines = verdict(summary, rows)
    settings = {k: getattr(args, k) for k in ("train_steps", "seeds", "num_samples", "sample_steps", "scales")}
    settings["model"] = {**MODEL_SETTINGS, "base": "iddpm.cli.demo.demo_base_config()"}
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "load_average_end": load_average()}
    result = {"machine": machine, "command": " ".join(["python", "benchmarks/guidance.py", *(argv or sys.argv[1:])]),
              "settings": settings, "training": training, "wall_seconds": round(time.perf_counter() - t0, 1),
              "real_train_split": real, "summary": summary, "verdict": lines, "per_seed": rows}
    atomic_write_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "table.md", table_md(summary, real, lines, settings, machine))
    plot(summary, real, out / "guidance.png")
    save_grid(grid, out / "samples.png", nrow=20)
    log("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
