"""Few-step samplers on a digits run: digit-FID and seconds per 1000 samples against NFE (model evaluations).

Usage::

    python benchmarks/samplers.py                    # the full default (hours on a shared 2-core CPU: estimate first)
    python benchmarks/samplers.py --quick            # < 2 min: NFE 5 and 10, one seed of 100 samples
    python benchmarks/samplers.py --run runs/demo --nfe 10,20 --seeds 0,1,2   # any digits run, trimmed

What is measured, for every sampler at NFE 5, 8, 10, 15, 20, 25, 50, 100 (``--nfe``) and, for ancestral sampling
only, the model's full T: ancestral sampling with the learned variances on the respaced diffusion
(``timestep_respacing=N``), DDIM (eta 0, ``--sampler ddim --steps N``: the respacing ``N``, evenly spaced from
T-1 to 0), and the solvers of :mod:`iddpm.diffusion.solvers` (``--sampler S --steps N`` on the full T-step
diffusion): DPM-Solver++ 2M with all three step grids (uniform, logsnr, karras), 3M, 2M SDE and UniPC with their
measured default grid (logsnr; ``--schedules default,uniform`` adds the uniform grid).  Each entry is the mean
over ``--seeds`` (default 3) of the digit-FID of ``--num_samples`` (default 1000) samples against the 360 test
digits (``api.evaluate(images, "digits-test")``: the shipped digits CNN), with its standard error over seeds;
sample i of seed s starts from the same x_T for every sampler, so comparisons use paired per-seed differences and
call a difference one only beyond two standard errors.

The run: ``--run DIR`` (any run directory, checkpoint or model file of 8x8 grayscale digits); by default the demo's
model (:func:`iddpm.cli.demo.demo_base_config`) trained for a fixed budget of ``--train_steps`` optimizer steps
(not minutes, so it reproduces) with :func:`iddpm.api.train`, cached under ``benchmarks/results/samplers/run/``
and reused by later calls.  torch runs on ``--threads`` threads (default 1).  Measurements are appended to
``OUT/raw.jsonl`` as they are made; a rerun with the same run and sample count skips those already there.

Outputs in ``--out`` (default ``benchmarks/results/samplers``; ``--quick``: its ``quick/`` folder): ``results.json``
(machine, settings, every measurement and summary), ``table.md`` (the tables and the issue's targets) and
``fid_vs_nfe.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from samplers_report import summarise, write_outputs
from speed import cpu_model, load_average

from iddpm import api
from iddpm.cli.demo import demo_base_config
from iddpm.config import apply_overrides
from iddpm.data.digits import load_digits_split
from iddpm.diffusion.solvers import DEFAULT_SCHEDULE
from iddpm.diffusion.timesteps import SCHEDULES

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "samplers"
DEFAULT_NFE = (5, 8, 10, 15, 20, 25, 50, 100)
DEFAULT_SEEDS = (0, 1, 2)
TRAIN_STEPS = 2000  # the default run's fixed budget (batch 64: 128k images; ~5-15 min of one CPU thread)
SAMPLERS = ("ancestral", "ddim", "dpm++2m", "dpm++3m", "dpm++2m-sde", "unipc")
QUICK = dict(nfe="5,10", seeds="0", num_samples=100, train_steps=150)


class Method(NamedTuple):
    """One sampler and its step grid (``schedule`` "" for ancestral / DDIM, which step the respaced diffusion)."""

    sampler: str
    schedule: str = ""

    @property
    def label(self) -> str:
        if self.sampler == "ancestral":
            return "ancestral (learned sigma)"
        if self.sampler == "ddim":
            return "ddim (eta 0)"
        return f"{self.sampler} ({self.schedule})"


def methods(samplers, all_schedules, schedules=("default",)) -> list[Method]:
    """The measured methods: every grid for the samplers in ``all_schedules``, the grids ``schedules`` (``default``
    = the solver's :data:`~iddpm.diffusion.solvers.DEFAULT_SCHEDULE`) for the other solvers."""
    out = []
    for s in samplers:
        if s in ("ancestral", "ddim"):
            out.append(Method(s))
            continue
        grids = SCHEDULES if s in all_schedules else [DEFAULT_SCHEDULE[s] if g == "default" else g for g in schedules]
        grids = sorted(set(grids), key=lambda g: (g != DEFAULT_SCHEDULE[s], SCHEDULES.index(g)))
        out.extend(Method(s, g) for g in grids)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="", help="digits run dir / checkpoint / model file (default: the cached "
                   "benchmark run, trained first if absent)")
    p.add_argument("--nfe", default=",".join(map(str, DEFAULT_NFE)), help="comma list of NFE (model evaluations)")
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma list of sampling seeds")
    p.add_argument("--num_samples", type=int, default=1000, help="samples per seed and entry (default 1000)")
    p.add_argument("--batch_size", type=int, default=500)
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="comma list (default: all)")
    p.add_argument("--all_schedules", default="dpm++2m", help="samplers measured on every step grid")
    p.add_argument("--schedules", default="default", help="grids of the other solvers: comma list of default "
                   "(the solver's DEFAULT_SCHEDULE), uniform, logsnr, karras")
    p.add_argument("--no_full_T", action="store_true", help="skip ancestral sampling with all T steps")
    p.add_argument("--train_steps", type=int, default=TRAIN_STEPS, help="budget of the default run (steps)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="", help=f"output folder (default {DEFAULT_OUT}; --quick: its quick/)")
    p.add_argument("--quick", action="store_true", help=f"a quick check (< 2 min with a cached run): {QUICK}")
    args = p.parse_args(argv)
    if args.quick:  # the quick settings unless given explicitly
        given = {a.split("=")[0].lstrip("-") for a in (argv if argv is not None else sys.argv[1:])}
        for k, v in QUICK.items():
            if k not in given:
                setattr(args, k, v)
    args.nfe = sorted({int(v) for v in args.nfe.split(",") if v})
    args.seeds = [int(v) for v in args.seeds.split(",") if v]
    args.samplers = [s for s in args.samplers.split(",") if s]
    args.all_schedules = {s for s in args.all_schedules.split(",") if s}
    args.schedules = [s for s in args.schedules.split(",") if s]
    if not args.schedules or set(args.schedules) - {"default", *SCHEDULES}:
        p.error(f"--schedules {','.join(args.schedules)}: choose from default,{','.join(SCHEDULES)}")
    args.out = Path(args.out) if args.out else (DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT)
    if min(args.nfe) < 1 or not args.seeds or args.num_samples < 2:
        p.error("--nfe values >= 1, at least one seed and --num_samples >= 2")
    unknown = sorted(set(args.samplers) - set(SAMPLERS))
    if unknown:
        p.error(f"--samplers {','.join(unknown)}: choose from {','.join(SAMPLERS)}")
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_run(args) -> tuple[Path, dict]:
    """The run to measure: ``--run``, else the cached default run (trained with the demo's settings for
    ``--train_steps`` optimizer steps when absent).  Returns (path, how it was obtained)."""
    if args.run:
        return Path(args.run), {"source": "given", "path": args.run}
    name = "run" if args.train_steps == TRAIN_STEPS else f"run-{args.train_steps}steps"
    run_dir = DEFAULT_OUT / name
    about = {"source": "trained by this benchmark (demo settings, fixed step budget)", "path": str(run_dir),
             "train_steps": args.train_steps}
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        log(f"using the cached run {run_dir} (delete it to retrain)")
        return run_dir, dict(about, cached=True)
    base = demo_base_config()
    settings = dict(run_dir=str(run_dir), max_steps=args.train_steps, max_minutes=0.0, seed=0)
    if "eval_every" in {f.name for f in dataclasses.fields(base.train)}:
        settings["eval_every"] = 0  # no periodic FID while training: this benchmark measures it
    cfg = apply_overrides(base, settings, source="benchmark").validate()
    log(f"training the demo's model for {args.train_steps} steps into {run_dir} (cached for later runs)")
    t0 = time.perf_counter()
    result = api.train(cfg, progress=False)
    return run_dir, dict(about, cached=False, train_seconds=round(time.perf_counter() - t0, 1), step=result.step)


def measure(loaded, method: Method, nfe: int, seed: int, args) -> dict:
    """Sample ``args.num_samples`` images with ``method`` at ``nfe`` model evaluations; their digit-FID and time."""
    model, full, cfg = loaded
    kw = dict(model=model, diffusion=full, cfg=cfg, num_samples=args.num_samples, batch_size=args.batch_size,
              seed=seed)
    if method.sampler == "ancestral":
        kw["timestep_respacing"] = "" if nfe == full.num_timesteps else str(nfe)
    else:
        kw.update(sampler=method.sampler, steps=nfe, schedule=method.schedule)
    res = api.sample(**kw)
    if res.nfe != nfe:
        raise RuntimeError(f"{method.label}: asked for {nfe} model evaluations, made {res.nfe}")
    fid = api.evaluate(res.images, "digits-test", metrics=("fid",))["fid"]
    return dict(sampler=method.sampler, schedule=method.schedule, label=method.label, nfe=nfe, seed=seed,
                fid=float(fid), seconds=round(res.seconds, 3), s_per_1000=res.seconds * 1000 / args.num_samples,
                load1=round(os.getloadavg()[0], 2))


def plan(args, T: int) -> list[tuple[Method, int, int]]:
    """Every (method, nfe, seed) to measure, by NFE first so that the few-step entries come early."""
    todo = []
    ms = methods(args.samplers, args.all_schedules, args.schedules)
    nfes = [n for n in args.nfe if n <= T]
    for nfe in nfes + ([T] if "ancestral" in args.samplers and not args.no_full_T and T not in nfes else []):
        for m in ms:
            if nfe == T and nfe not in nfes and m.sampler != "ancestral":
                continue  # the full T only for ancestral sampling
            todo.extend((m, nfe, s) for s in args.seeds)
    return todo


def throughput(loaded, args) -> float:
    """Image-steps per second measured now (a short dpm++2m run), for the estimate."""
    model, full, cfg = loaded
    n = min(200, args.num_samples)
    t0 = time.perf_counter()
    api.sample(model=model, diffusion=full, cfg=cfg, num_samples=n, batch_size=args.batch_size, seed=99,
               sampler="dpm++2m", steps=5)
    return n * 5 / (time.perf_counter() - t0)


def data_floor(num: int) -> float:
    """digit-FID of ``num`` real train digits against the test digits: what a perfect sampler would score."""
    images = load_digits_split("train")[0][:num, :, :, None]
    return float(api.evaluate(images, "digits-test", metrics=("fid",))["fid"])


def load_raw(path: Path, key: dict) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if all(r.get(k) == v for k, v in key.items())]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), time.perf_counter()
    load_at_start = load_average()
    run_path, about = ensure_run(args)
    model, _, cfg = api.load_run(run_path, device="cpu")
    if (cfg.model.image_size, cfg.model.in_channels) != (8, 1):
        raise SystemExit(f"--run {run_path}: digit-FID needs 8x8 grayscale digits, got {cfg.model.image_size}x"
                         f"{cfg.model.image_size}x{cfg.model.in_channels}")
    full = api.build_diffusion(cfg.diffusion, "")
    loaded, T = (model, full, cfg), full.num_timesteps
    args.out.mkdir(parents=True, exist_ok=True)
    key = dict(run=str(run_path), num_samples=args.num_samples)
    raw_file = args.out / "raw.jsonl"
    done = {(r["label"], r["nfe"], r["seed"]): r for r in load_raw(raw_file, key)}
    todo = [(m, n, s) for m, n, s in plan(args, T) if (m.label, n, s) not in done]
    rate = throughput(loaded, args)
    img_steps = sum(n for _, n, _ in todo) * args.num_samples
    log(f"{len(todo)} entries to measure ({len(done)} cached): {img_steps / 1e6:.2f}M image-steps at "
        f"{rate:.0f} image-steps/s now -> about {img_steps / rate / 60:.0f} min (+ FID, ~1 s per entry)")
    with raw_file.open("a") as f:
        for i, (m, nfe, seed) in enumerate(todo):
            row = dict(measure(loaded, m, nfe, seed, args), **key)
            done[(m.label, nfe, seed)] = row
            f.write(json.dumps(row) + "\n")
            f.flush()
            log(f"[{i + 1}/{len(todo)}] {m.label} NFE {nfe} seed {seed}: FID {row['fid']:.3f}, "
                f"{row['s_per_1000']:.1f} s/1000")
    # the report holds every measurement of this run and sample count made with these seeds (earlier calls too)
    raw = [r for r in done.values() if r["seed"] in args.seeds]
    meta = dict(benchmark="few-step samplers: digit-FID and wall time vs NFE", started=started,
                argv=sys.argv[1:] if argv is None else list(argv), command=_command(argv),
                machine=dict(cpu=cpu_model(), cores=os.cpu_count(), torch_threads=args.threads,
                             torch=torch.__version__, python=platform.python_version(), load_avg_at_start=load_at_start,
                             load_avg_at_end=load_average()),
                run=dict(about, T=T, config=cfg.to_dict()), num_samples=args.num_samples, seeds=args.seeds,
                batch_size=args.batch_size, nfe=args.nfe, data_floor_fid=data_floor(args.num_samples),
                wall_seconds=round(time.perf_counter() - t0, 1), image_steps_per_s_probe=round(rate, 1))
    files = write_outputs(args.out, meta, raw, summarise(raw), T)
    print((args.out / "table.md").read_text())
    log("wrote " + ", ".join(str(p) for p in files))
    return 0


def _command(argv) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return "python benchmarks/samplers.py" + "".join(f" {a}" for a in args)


if __name__ == "__main__":
    sys.exit(main())
