"""Wiring of a training run: RunConfig -> data, model, diffusion, sampler, context, sinks -> :class:`Trainer`.

``train(cfg)`` is what ``iddpm train`` runs (also under ``torchrun``); ``build_trainer`` returns the
ready trainer without running it (tests, notebooks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from iddpm.build import build_diffusion, build_model
from iddpm.checkpoints.openai import load_openai_checkpoint, load_openai_state_dict
from iddpm.checkpoints.run_dir import (
    Checkpoint,
    check_fresh_run_dir,
    check_run_dir_path,
    check_writable,
    clear_previous_run,
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
from iddpm.runtime.lock import FolderLock, check_unlocked, lock_folder
from iddpm.train.evaluation import PeriodicEvaluator, prepare_evaluation
from iddpm.train.trainer import Trainer, TrainResult, step_limit

MAY_CHANGE_ON_RESUME = frozenset({"dropout", "use_checkpoint"})  # neither changes what the weights compute


@dataclass
class Prepared:
    """The trainer and what it was built from; ``lock`` holds the run directory until :meth:`release`."""

    trainer: object  # None when the run is already at its step limit (``already_done`` says so)
    run_dir: Path
    dist: object
    resumed_from: Path | None
    lock: FolderLock | None = None
    already_done: str = ""
    step: int = 0  # the step the run starts (continues) at

    def release(self) -> None:
        """Unlock the run directory (also done by the OS when the process ends)."""
        if self.lock is not None:
            self.lock.release()


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


def _same_run(resume_from, run_dir: Path) -> bool:
    """Whether the checkpoint lies inside ``run_dir`` (continuing that run from one of its own step folders)."""
    try:
        return Path(resume_from).resolve().is_relative_to(run_dir.resolve())
    except OSError:
        return False


def _fmt(v) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def check_resume_config(cfg: RunConfig, ckpt: Checkpoint, run_dir: Path | None) -> None:
    """Model and diffusion settings may not change when a run continues (only those in ``MAY_CHANGE_ON_RESUME``):
    the checkpoint's own config (inside its model file) is the truth.  ``run_dir``: the run's folder when
    ``--resume`` (its ``config.json`` tells a flag from a stale file).  One-line ConfigError naming the flag."""
    saved = read_config(run_dir) if run_dir is not None and (run_dir / "config.json").is_file() else None
    what = "the run was" if run_dir is not None else "the checkpoint was"
    for sec in ("model", "diffusion"):
        for f in dataclasses.fields(getattr(cfg, sec)):
            now, was = getattr(getattr(cfg, sec), f.name), getattr(getattr(ckpt.config, sec), f.name)
            if f.name in MAY_CHANGE_ON_RESUME or now == was:
                continue
            if saved is not None and getattr(getattr(saved, sec), f.name) == now != was:
                raise ConfigError(f"--{f.name} {_fmt(now)}: {run_dir / 'config.json'} says so but {ckpt.path} was "
                                  f"trained with {_fmt(was)}; pass --{f.name} {_fmt(was)} (config.json is rewritten "
                                  "when the run continues)")
            raise ConfigError(f"--{f.name} {_fmt(now)}: drop --{f.name}, {what} trained with {_fmt(was)} "
                              f"({ckpt.path}); model and diffusion settings cannot change when a run continues "
                              "(use a new --run_dir to train another model)")


def preflight(cfg: RunConfig, run_dir: Path, resume_from) -> Checkpoint | None:
    """Everything checked before a run writes anything (reads only; one-line ConfigErrors): ``--run_dir`` is a
    folder (or can be one), no live process holds its lock, a new run does not land on another run's files
    (``--overwrite``), a continued run can write its folder, and the checkpoint fits the settings.  Returns the
    checkpoint to continue from (None for a new run)."""
    check_run_dir_path(run_dir)
    check_unlocked(run_dir)
    continuing = resume_from is not None and (cfg.train.resume or _same_run(resume_from, run_dir))
    if continuing:
        check_writable(run_dir)
    else:
        check_fresh_run_dir(run_dir, cfg.train.overwrite)
    if resume_from is None:
        return None
    ckpt = load_resume_checkpoint(str(resume_from), cfg)
    check_resume_config(cfg, ckpt, run_dir if cfg.train.resume else None)
    return ckpt


def _lock(run_dir: Path, dist) -> FolderLock | None:
    """Rank 0 locks the run directory; every rank learns whether it could (all raise when it could not)."""
    lock, err = None, None
    if dist.is_main:
        try:
            lock = lock_folder(run_dir, flag="--run_dir")
        except ConfigError as exc:
            err = exc
    if dist.any_flag(err is not None):
        raise err or ConfigError(f"--run_dir {run_dir}: rank 0 could not lock it (see its message)")
    return lock


def _trainer_parts(cfg: RunConfig, dist, local_batch: int):
    """Data loader, model, diffusion, timestep sampler, train module and sample-grid objects of a run."""
    tc = cfg.train
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
    return dict(model=model, train_module=train_module, diffusion=diffusion, data=loader, schedule_sampler=sampler,
                sample_diffusion=sample_diffusion, sample_ddim=ddim, grid_low_res=grid_low_res)


def build_trainer(cfg: RunConfig, *, run_dir: str | os.PathLike | None = None, dist=None, progress: bool = True,
                  resume_from: str | os.PathLike | None = None) -> Prepared:
    """Build everything a run needs (on every rank) and return the trainer, resumed when asked.

    ``resume_from``: checkpoint to continue from (run dir, step folder, model ``.safetensors`` or the original's
    ``modelNNNNNN.pt``).  Nothing is written before every check passed (:func:`preflight`, the checkpoint
    loaded into the trainer); then rank 0 locks the run directory (held by the returned ``Prepared.lock``
    until :meth:`Prepared.release`) and writes ``config.json``.  A run already at its step limit gets
    ``trainer=None`` and ``already_done`` (nothing written).
    """
    cfg = cfg.validate()
    dist = dist or init_distributed(cfg.train.device)
    local_batch = check_batch(cfg, dist.world_size)
    evaluation = prepare_evaluation(cfg, dist.device)  # --eval_every: sampler, steps, feature network checked now
    run_dir = Path(run_dir) if run_dir is not None else resolve_run_dir(cfg)
    ckpt = preflight(cfg, run_dir, resume_from)
    limit, limit_name = step_limit(cfg.train)
    if ckpt is not None and limit is not None and ckpt.step >= limit:
        return Prepared(trainer=None, run_dir=run_dir, dist=dist, resumed_from=ckpt.path, step=ckpt.step,
                        already_done=f"run already at step {ckpt.step} ({limit_name} {limit}); nothing to do "
                                     f"(raise --{limit_name} to train on)")
    trainer = Trainer(dist=dist, cfg=cfg, run_dir=run_dir, progress=progress,
                      **_trainer_parts(cfg, dist, local_batch))
    if ckpt is not None:
        trainer.load(ckpt)
    lock = _lock(run_dir, dist)
    try:
        if dist.is_main:
            if ckpt is None or not (cfg.train.resume or _same_run(ckpt.path, run_dir)):
                check_fresh_run_dir(run_dir, cfg.train.overwrite)  # again, now that the folder is ours
                if cfg.train.overwrite:
                    clear_previous_run(run_dir)
            write_config(run_dir, cfg)
        trainer.sinks = make_sinks(run_dir, enabled=dist.is_main, resume_step=ckpt.step if ckpt else None)
        if evaluation is not None:  # rank 0 computes (or reuses) the reference statistics here
            same = ckpt is not None and (cfg.train.resume or _same_run(ckpt.path, run_dir))
            trainer.evaluator = PeriodicEvaluator(cfg, evaluation, run_dir=run_dir, dist=dist,
                                                  resume_state=ckpt.state.get("eval") if same else None,
                                                  resume_step=ckpt.step if same else None)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return Prepared(trainer=trainer, run_dir=run_dir, dist=dist, resumed_from=ckpt.path if ckpt else None,
                    lock=lock, step=trainer.step)


def resume_source(cfg: RunConfig) -> Path | None:
    """What to continue from: ``--resume`` -> the run directory's latest checkpoint, else ``--resume_checkpoint``."""
    if cfg.train.resume:
        run_dir = resolve_run_dir(cfg)
        if not cfg.train.run_dir and not os.environ.get("OPENAI_LOGDIR"):
            raise ConfigError("--resume: give the run to continue with --run_dir DIR")
        check_run_dir_path(run_dir)
        return find_checkpoint(run_dir)
    if cfg.train.resume_checkpoint:
        return Path(cfg.train.resume_checkpoint)
    return None


def load_saved_run_config(cfg: RunConfig) -> RunConfig | None:
    """The config a resumed run continues from (None for a fresh run): ``--resume`` -> the run directory's
    ``config.json`` (without one, its latest checkpoint's config); ``--resume_checkpoint`` of an iddpm checkpoint
    -> its own config (with fresh run settings); the original's ``.pt`` files carry none."""
    if cfg.train.resume:
        run_dir = resolve_run_dir(cfg)
        if (run_dir / "config.json").is_file():
            return read_config(run_dir)
        found = list_checkpoints(run_dir)
        return load_checkpoint(found[-1][1], load_training_state=False).config if found else None
    if cfg.train.resume_checkpoint and not cfg.train.resume_checkpoint.endswith(".pt"):
        saved = load_checkpoint(cfg.train.resume_checkpoint, load_training_state=False).config
        fresh = dataclasses.replace(saved.train, run_dir="", resume=False, resume_checkpoint="", overwrite=False)
        return saved.replace(train=fresh)
    return None


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """``--deterministic``: ``torch.use_deterministic_algorithms(True, warn_only=True)`` (and, for cuBLAS,
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` when unset) for the duration; both set back afterwards."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    env_before = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        if env_before is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def train(cfg: RunConfig, *, progress: bool = True, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or continue) a training run; returns the :class:`~iddpm.train.trainer.TrainResult`.

    ``log`` (rank 0) gets one line saying what a resume restored (or that the run is already at its step
    limit: then nothing is written and ``stop_reason`` is ``"already_done"``)."""
    with deterministic_algorithms(cfg.data.deterministic):
        prepared = build_trainer(cfg, resume_from=resume_source(cfg), progress=progress)
        say = log if log is not None and prepared.dist.is_main else (lambda _line: None)
        try:
            trainer = prepared.trainer
            if trainer is None:
                say(prepared.already_done)
                return TrainResult(prepared.step, "already_done", None, 0.0, 0.0, start_step=prepared.step)
            if trainer.restored:
                say(trainer.restored)
                warning = trainer.health.resume_warning()
                if warning:
                    say(warning)
            return trainer.run()
        finally:
            prepared.release()
            prepared.dist.shutdown()
