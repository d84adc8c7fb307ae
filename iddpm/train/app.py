"""Wiring of a training run: RunConfig -> data, model, diffusion, sampler, context, sinks -> :class:`Trainer`.

``train(cfg)`` is what ``iddpm train`` runs (also under ``torchrun``); ``build_trainer`` returns the
ready trainer without running it (tests, notebooks).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from iddpm.build import build_diffusion, build_model
from iddpm.checkpoints.openai import load_openai_checkpoint, load_openai_state_dict
from iddpm.checkpoints.run_dir import (
    Checkpoint,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_config,
    resolve_run_dir,
    write_config,
)
from iddpm.config import ConfigError, RunConfig
from iddpm.data import load_dataset, make_loader
from iddpm.diffusion import create_named_schedule_sampler
from iddpm.models import optimize
from iddpm.runtime import init_distributed, make_sinks, seed_everything
from iddpm.train.trainer import Trainer, TrainResult


@dataclass
class Prepared:
    """The trainer and what it was built from."""

    trainer: object
    run_dir: Path
    dist: object
    resumed_from: Path | None


def check_batch(cfg: RunConfig, world_size: int) -> int:
    """The per-rank batch: ``--batch_size`` is the global batch and must split evenly over the ranks."""
    b = cfg.train.batch_size
    if b % world_size:
        raise ConfigError(f"--batch_size {b}: the global batch must be divisible by the {world_size} processes; "
                          f"use a multiple of {world_size}")
    local = b // world_size
    mb = cfg.train.microbatch
    if mb > 0 and mb > local:
        raise ConfigError(f"--microbatch {mb}: larger than the per-process batch {local}; lower it or use -1")
    return local


def load_resume_checkpoint(path: str, cfg: RunConfig):
    """A :class:`~iddpm.checkpoints.run_dir.Checkpoint` from an iddpm checkpoint or an original ``modelNNNNNN.pt``
    (then the sibling ``ema_<rate>_NNNNNN.pt`` and ``optNNNNNN.pt`` are used when present)."""
    p = Path(path)
    if p.suffix != ".pt":
        return load_checkpoint(p)
    model = load_openai_checkpoint(p, cfg)
    m = re.fullmatch(r"model(\d+)\.pt", p.name)
    state: dict = {}
    emas: dict[float, dict] = {}
    optimizer = None
    if m:
        num = m.group(1)
        state["step"] = int(num)  # the original's resume continues from its file number
        for rate in cfg.train.ema_rates:  # the original names them f"ema_{rate}_{step:06d}.pt" with a float rate
            f = p.with_name(f"ema_{rate}_{num}.pt")
            if f.is_file():
                emas[rate] = load_openai_checkpoint(f, cfg)
        opt = p.with_name(f"opt{num}.pt")
        if opt.is_file():
            optimizer = torch.load(opt, map_location="cpu", weights_only=True)
    else:
        load_openai_state_dict(p)  # validated above; no step known
    return Checkpoint(path=p, model=model, config=cfg, emas=emas, optimizer=optimizer, state=state)


def _sample_diffusion(cfg: RunConfig):
    """A respaced copy for sample grids: 50 ancestral steps with learned sigmas, else DDIM-50."""
    n = min(50, cfg.diffusion.diffusion_steps)
    if cfg.diffusion.learn_sigma:
        return build_diffusion(cfg.diffusion, timestep_respacing=str(n)), False
    try:
        return build_diffusion(cfg.diffusion, timestep_respacing=f"ddim{n}"), True
    except ValueError:
        return build_diffusion(cfg.diffusion, timestep_respacing=str(n)), True


def build_trainer(cfg: RunConfig, *, run_dir: str | os.PathLike | None = None, dist=None, progress: bool = True,
                  resume_from: str | os.PathLike | None = None) -> Prepared:
    """Build everything a run needs (on every rank) and return the trainer, resumed when asked.

    ``resume_from``: checkpoint to continue from (run dir, step folder, model ``.safetensors`` or the original's
    ``modelNNNNNN.pt``).  The run directory gets ``config.json`` (rank 0).
    """
    cfg = cfg.validate()
    tc = cfg.train
    dist = dist or init_distributed(tc.device)
    local_batch = check_batch(cfg, dist.world_size)
    run_dir = Path(run_dir) if run_dir is not None else resolve_run_dir(cfg)
    if resume_from is None and list_checkpoints(run_dir):
        raise ConfigError(f"--run_dir {run_dir}: already holds checkpoints; add --resume to continue that run "
                          "or choose another --run_dir")

    dataset = load_dataset(cfg.data, cfg.model.image_size, cfg.model.in_channels, split="train", seed=tc.seed,
                           with_labels=cfg.model.class_cond)
    if cfg.model.class_cond:
        have = int(getattr(dataset, "num_classes", 0) or 0)
        if have == 0:
            raise ConfigError(f"--class_cond: the data ({cfg.data.data_dir or 'digits'}) has no labels; "
                              "drop --class_cond or give labelled data (see --labels)")
        if have != cfg.model.num_classes:
            raise ConfigError(f"--num_classes {cfg.model.num_classes}: the data has {have} classes; "
                              f"use --num_classes {have}")
    loader = make_loader(dataset, local_batch, shuffle=not cfg.data.deterministic, seed=tc.seed, rank=dist.rank,
                         world_size=dist.world_size, num_workers=cfg.data.num_workers, drop_last=True, infinite=True)

    seed_everything(tc.seed)  # same initial weights on every rank (and broadcast below)
    model = build_model(cfg).to(dist.device)
    diffusion = build_diffusion(cfg.diffusion)
    sampler = create_named_schedule_sampler(tc.schedule_sampler, diffusion)
    dist.broadcast_module(model)
    seed_everything(tc.seed + 7919 * (dist.rank + 1))  # per-rank stream for dropout
    fast = optimize(model, "train") if tc.fast else model
    train_module = dist.wrap(fast)

    sample_diffusion, ddim = (None, False)
    grid_low_res = None
    if tc.sample_every > 0 and dist.is_main:
        sample_diffusion, ddim = _sample_diffusion(cfg)
        if cfg.model.super_res:
            xs = torch.stack([dataset[i][0] for i in range(min(16, len(dataset)))])
            grid_low_res = F.interpolate(xs, cfg.model.small_size, mode="area")

    ckpt = load_resume_checkpoint(str(resume_from), cfg) if resume_from is not None else None
    start_step = ckpt.step if ckpt is not None else None
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, cfg)
    sinks = make_sinks(run_dir, enabled=dist.is_main, resume_step=start_step)
    trainer = Trainer(model=model, train_module=train_module, diffusion=diffusion, data=loader,
                      schedule_sampler=sampler, dist=dist, cfg=cfg, sinks=sinks, run_dir=run_dir,
                      sample_diffusion=sample_diffusion, sample_ddim=ddim, grid_low_res=grid_low_res,
                      progress=progress)
    if ckpt is not None:
        trainer.load(ckpt)
    return Prepared(trainer=trainer, run_dir=run_dir, dist=dist, resumed_from=ckpt.path if ckpt else None)


def resume_source(cfg: RunConfig) -> Path | None:
    """What to continue from: ``--resume`` -> the run directory's latest checkpoint, else ``--resume_checkpoint``."""
    if cfg.train.resume:
        run_dir = resolve_run_dir(cfg)
        if not cfg.train.run_dir and not os.environ.get("OPENAI_LOGDIR"):
            raise ConfigError("--resume: give the run to continue with --run_dir DIR")
        return find_checkpoint(run_dir)
    if cfg.train.resume_checkpoint:
        return Path(cfg.train.resume_checkpoint)
    return None


def load_saved_run_config(cfg: RunConfig) -> RunConfig | None:
    """The config a resumed run continues from (None for a fresh run): ``--resume`` -> the run directory's
    ``config.json``; ``--resume_checkpoint`` of an iddpm checkpoint -> its own config (with fresh run settings);
    the original's ``.pt`` files carry none."""
    if cfg.train.resume:
        run_dir = resolve_run_dir(cfg)
        return read_config(run_dir) if (run_dir / "config.json").is_file() else None
    if cfg.train.resume_checkpoint and not cfg.train.resume_checkpoint.endswith(".pt"):
        saved = load_checkpoint(cfg.train.resume_checkpoint, load_training_state=False).config
        fresh = dataclasses.replace(saved.train, run_dir="", resume=False, resume_checkpoint="")
        return saved.replace(train=fresh)
    return None


def train(cfg: RunConfig, *, progress: bool = True) -> TrainResult:
    """Run (or continue) a training run; returns the :class:`~iddpm.train.trainer.TrainResult`."""
    prepared = build_trainer(cfg, resume_from=resume_source(cfg), progress=progress)
    try:
        return prepared.trainer.run()
    finally:
        prepared.dist.shutdown()
