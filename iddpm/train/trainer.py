"""The training loop.  It receives every object it works with (model, diffusion, data, sampler, process
context, sinks, config) and builds none of them (see :mod:`iddpm.train.app` for the wiring).

One optimizer step (the original's ``TrainLoop.run_step``):

1. lr from :func:`~iddpm.train.schedule.lr_at` (linear anneal over ``lr_anneal_steps``, optional warmup);
2. the rank's batch is split into micro-batches of ``--microbatch`` examples; for each, timesteps and
   noise are drawn per example (:mod:`iddpm.train.draws`), ``diffusion.training_losses`` is computed
   (model forward under the precision policy's autocast), the loss-aware sampler is fed the raw losses,
   and ``mean(loss * weights)`` of the micro-batch is back-propagated.  As in the original, micro-batch
   gradients are **summed** (not averaged): with ``k`` micro-batches the gradient is ``k`` times the
   full-batch mean's, which AdamW's normalisation makes (almost) irrelevant, but it matters for
   ``--grad_clip``.  Under DDP only the last micro-batch synchronises gradients (``no_sync``);
3. optional gradient clipping, the optimizer step (skipped under fp16 when gradients overflow), then
   every EMA is updated (not after a skipped step).

``step`` counts completed optimizer steps; checkpoint ``step_N`` holds weights after N updates.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from iddpm.checkpoints.run_dir import CHECKPOINTS, save_checkpoint, step_name
from iddpm.config import RunConfig
from iddpm.runtime.distributed import DistContext
from iddpm.runtime.seeding import capture_rng_state
from iddpm.runtime.sinks import MultiSink, ProgressBar
from iddpm.sample import generate, save_grid
from iddpm.train.draws import drop_labels, example_draws, global_positions
from iddpm.train.ema import EMA
from iddpm.train.guards import CheckpointHealth, LossScaleGuard, StopSignals
from iddpm.train.meter import MetricMeter
from iddpm.train.precision import Precision
from iddpm.train.restore import restore_checkpoint
from iddpm.train.schedule import lr_at


def param_fingerprint(model: torch.nn.Module) -> str:
    """SHA-1 of all parameter bytes (to check that every rank holds the same weights)."""
    h = hashlib.sha1()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf (fp32/bf16); the message names the step and the timesteps involved."""


class LossScaleCollapse(NonFiniteLossError):
    """fp16: the loss scale collapsed / most recent steps were skipped (see :mod:`iddpm.train.guards`)."""


class TrainingAborted(KeyboardInterrupt):
    """A third Ctrl-C: the run stopped without writing a checkpoint; the message says what was lost."""


def step_limit(tcfg) -> tuple[int | None, str]:
    """The step a run stops at and the flag that sets it (``(None, "")``: no step limit)."""
    limits = [(s, name) for name, s in (("max_steps", tcfg.max_steps), ("lr_anneal_steps", tcfg.lr_anneal_steps))
              if s > 0]
    return min(limits) if limits else (None, "")


@dataclass
class TrainResult:
    step: int  # completed optimizer steps
    stop_reason: str  # max_steps | lr_anneal_steps | max_minutes | signal | already_done
    last_checkpoint: Path | None
    images_per_second: float
    seconds: float
    start_step: int = 0  # the step the run started (or resumed) at
    eval_seconds: float = 0.0  # spent in periodic evaluation (--eval_every): in seconds, not in --max_minutes


class Trainer:
    """Runs optimizer steps until a limit, a signal or an error; checkpoints into ``run_dir``.

    Args:
        model: the raw network (parameters float32, on ``dist.device``); EMA / state dicts come from it.
        train_module: what is called in the forward pass (``optimize(model)``, possibly wrapped in DDP);
            defaults to ``model``.
        diffusion: object with ``training_losses`` and ``num_timesteps``.
        data: iterable of ``(x float32 [b, C, H, W], cond)`` for this rank (``b`` = global batch / world size),
            with ``state_dict()/load_state_dict()`` for exact resume (e.g. :class:`iddpm.data.BatchLoader`).
        schedule_sampler: timestep sampler (``sample``, optional ``update_with_local_losses``).
        dist: the process context.  sinks: metric sinks (rank 0's; empty elsewhere).
        cfg: the resolved run config.  run_dir: where checkpoints / samples go (None: nowhere).
        sample_diffusion: a (respaced) diffusion for the sample grids (None: no grids); ``sample_ddim``:
            sample it with DDIM (eta 0) instead of ancestral steps.
        grid_low_res: float32 [n, C, h, w] inputs for super-resolution sample grids.
        evaluator: periodic sample-quality evaluation (:class:`iddpm.train.evaluation.PeriodicEvaluator`) or None.
    """

    def __init__(self, *, model: torch.nn.Module, diffusion, data, schedule_sampler, dist: DistContext,
                 cfg: RunConfig, sinks: MultiSink | None = None, run_dir: str | Path | None = None,
                 train_module: torch.nn.Module | None = None, sample_diffusion=None,
                 sample_ddim: bool = False, grid_low_res: torch.Tensor | None = None,
                 progress: bool = True, evaluator=None) -> None:
        self.model = model
        self.evaluator = evaluator
        self.train_module = train_module if train_module is not None else model
        self.diffusion = diffusion
        self.data = data
        self.sampler = schedule_sampler
        self.dist = dist
        self.cfg = cfg
        self.tcfg = cfg.train
        self.sinks = sinks or MultiSink()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.sample_diffusion = sample_diffusion
        self.sample_ddim = sample_ddim
        self.grid_low_res = grid_low_res
        self.progress = progress
        self.device = dist.device
        self.global_batch = self.tcfg.batch_size
        self.local_batch = self.global_batch // dist.world_size
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.tcfg.lr, weight_decay=self.tcfg.weight_decay)
        self.precision = Precision(self.tcfg.effective_precision, self.device, self.tcfg.fp16_scale_growth)
        self.ema = EMA(model, self.tcfg.ema_rates)
        self.meter = MetricMeter()
        self.step = 0
        self.last_checkpoint: Path | None = None
        self._last_saved_step: int | None = None
        self.health = CheckpointHealth()
        self.scale_guard = LossScaleGuard()
        self.signals = StopSignals(announce=dist.is_main)
        self.restored = ""  # after load(): one line saying what was restored
        self._sample_model: torch.nn.Module | None = None

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------
    def training_state(self) -> dict:
        """JSON-able state besides weights/optimizer (gathered from every rank: RNG states are per rank)."""
        rng = self.dist.all_gather_object(capture_rng_state())
        state = {
            "world_size": self.dist.world_size,
            "global_batch": self.global_batch,
            "precision": self.precision.mode,
            "scaler": self.precision.state_dict(),
            "ema_rates": list(self.ema.rates),
            "sampler": self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else None,
            "data": self.data.state_dict() if hasattr(self.data, "state_dict") else None,
            "rng": rng,
            "health": self.health.state_dict(),
        }
        if self.evaluator is not None:
            state["eval"] = self.evaluator.state_dict()
        return state

    def save(self) -> Path | None:
        """Checkpoint the current step into ``run_dir`` (all ranks call it; rank 0 writes)."""
        state = self.training_state()  # collective
        state["param_sha1"] = self.dist.all_gather_object(param_fingerprint(self.model))
        if len(set(state["param_sha1"])) > 1:
            raise RuntimeError(f"ranks out of sync at step {self.step}: parameter hashes {state['param_sha1']}")
        path = None
        if self.dist.is_main and self.run_dir is not None:
            path = save_checkpoint(
                self.run_dir, self.step, cfg=self.cfg, model_state=self.model.state_dict(),
                ema_states=[(r, self.ema.state_dict(self.model, i)) for i, r in enumerate(self.ema.rates)],
                optimizer_state=self.optimizer.state_dict(), state=state, keep_last=self.tcfg.keep_last,
                keep_steps=(self.health.protected_step(),),
            )
        self.dist.barrier()
        self._last_saved_step = self.step
        if self.run_dir is not None:  # every rank names the same folder in its messages
            self.health.on_save(self.step, self.run_dir / CHECKPOINTS / step_name(self.step))
        if path is not None:
            self.last_checkpoint = path
        return path

    def load(self, ckpt, *, restore_rng: bool = True) -> None:
        """Continue from a :class:`~iddpm.checkpoints.run_dir.Checkpoint` (weights-only checkpoints restart
        optimizer and EMA from the weights).  Sets :attr:`restored`: one line naming what was restored and
        what starts fresh."""
        self.restored = restore_checkpoint(self, ckpt, restore_rng=restore_rng)

    # ------------------------------------------------------------------------------------------
    # one step
    # ------------------------------------------------------------------------------------------
    def _model_kwargs(self, x: torch.Tensor, cond: dict) -> dict:
        kwargs = {}
        if self.cfg.model.class_cond:  # --class_dropout: labels -> num_classes, drawn per (seed, step, position)
            m, positions = self.cfg.model, global_positions(len(cond["y"]), self.dist.rank, self.dist.world_size)
            kwargs["y"] = drop_labels(cond["y"], self.tcfg.seed, self.step, positions, m.class_dropout,
                                      m.num_classes).to(self.device)
        if self.cfg.model.super_res:  # the original's load_superres_data
            kwargs["low_res"] = F.interpolate(x, self.cfg.model.small_size, mode="area")
        return kwargs

    def _forward(self, x, t, **kwargs):
        with self.precision.autocast():
            out = self.train_module(x, t, **kwargs)
        return out.float()

    def train_step(self, x: torch.Tensor, cond: dict) -> dict:
        """One optimizer step on this rank's batch; returns ``{"loss": float, "stepped": bool}``."""
        tc = self.tcfg
        x = x.to(self.device, non_blocking=True).float()
        kwargs = self._model_kwargs(x, cond)
        n = x.shape[0]
        lr = lr_at(self.step, tc.lr, tc.lr_anneal_steps, tc.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        micro = tc.microbatch if tc.microbatch > 0 else n
        positions = global_positions(n, self.dist.rank, self.dist.world_size)
        bad_t: list[int] = []
        loss_acc = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(0, n, micro):
            sl = slice(i, min(i + micro, n))
            t, weights, noise = example_draws(self.sampler, tc.seed, self.step, positions[sl], x.shape[1:],
                                              self.device)
            mkw = {k: v[sl] for k, v in kwargs.items()}
            last = sl.stop >= n
            sync = contextlib.nullcontext() if last or not hasattr(self.train_module, "no_sync") \
                else self.train_module.no_sync()
            with sync:
                losses = self.diffusion.training_losses(self._forward, x[sl], t, model_kwargs=mkw, noise=noise)
                if hasattr(self.sampler, "update_with_local_losses"):
                    self.sampler.update_with_local_losses(t, losses["loss"].detach())
                loss = (losses["loss"] * weights).mean()
                self.meter.add_losses(self.diffusion.num_timesteps, t, {k: v * weights for k, v in losses.items()})
                finite = torch.isfinite(losses["loss"].detach())
                if not bool(finite.all()):
                    bad_t += t[~finite].tolist()
                loss_acc += loss.detach().double() * (sl.stop - sl.start) / n
                self.precision.scale(loss).backward()
        loss_sum = float(loss_acc)
        nonfinite = self.dist.any_flag(bool(bad_t))
        if nonfinite and not self.precision.scaling:
            everywhere = sorted({t for ts in self.dist.all_gather_object(bad_t) for t in ts})
            self.health.observe(math.nan)
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step + 1} (timesteps {everywhere}); stopped without updating. "
                f"{self.health.describe()}. Try a lower --lr, --grad_clip 1, or --precision fp32"
            )
        self.precision.unscale_(self.optimizer)
        grad_norm = self._grad_norm()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip, foreach=True)
        stepped = self.precision.step(self.optimizer)
        if stepped:
            self.ema.update(self.model)
        self.step += 1
        self.health.observe(math.nan if nonfinite else loss_sum)
        self.meter.add("grad_norm", grad_norm)
        self.meter.add("lr", lr)
        if self.precision.scaling:
            self.meter.add("lg_loss_scale", math.log2(self.precision.loss_scale()))
            self.meter.add("skipped_steps", 0.0 if stepped else 1.0)
            why = self.scale_guard.update(self.step, stepped, not nonfinite, self.precision.loss_scale())
            if why:
                raise LossScaleCollapse(f"{why}; stopped without saving. {self.health.describe()}. Try a lower --lr, "
                                        "--grad_clip 1, or --precision fp32")
        return {"loss": loss_sum, "stepped": stepped}

    def _grad_norm(self) -> float:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        norms = torch._foreach_norm(grads)
        return float(torch.linalg.vector_norm(torch.stack(norms)).item())

    # ------------------------------------------------------------------------------------------
    # loop
    # ------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train until ``--max_steps`` / ``--lr_anneal_steps`` / ``--max_minutes`` / SIGINT / SIGTERM.

        A first signal stops after the step in progress and writes its checkpoint; a second Ctrl-C is told that
        this is happening; a third raises :class:`TrainingAborted` (no checkpoint written; its message says
        which steps are lost)."""
        tc = self.tcfg
        limit, limit_name = step_limit(tc)
        start_step = self.step
        self.signals.install()
        bar = ProgressBar(limit, self.step, self.global_batch, enabled=self.dist.is_main and self.progress,
                          seconds_budget=60.0 * tc.max_minutes if tc.max_minutes > 0 else None)
        t0 = time.perf_counter()
        t_log, step_log = t0, self.step
        eval_s = 0.0  # periodic evaluation: kept out of --max_minutes and img/s
        reason = "max_steps"
        it = iter(self.data)
        try:
            while True:
                if limit is not None and self.step >= limit:
                    reason = limit_name
                    break
                stop_time = tc.max_minutes > 0 and time.perf_counter() - t0 - eval_s >= 60.0 * tc.max_minutes
                if self.dist.any_flag(self.signals.requested is not None or stop_time):
                    reason = "signal" if self.signals.requested or not stop_time else "max_minutes"
                    break
                x, cond = next(it)
                out = self.train_step(x, cond)
                bar.update(self.step, out["loss"])
                if tc.log_interval > 0 and self.step % tc.log_interval == 0:
                    now = time.perf_counter()
                    metrics = self.meter.merge(self.dist.all_gather_object(self.meter.totals()))  # all ranks
                    metrics["samples"] = float(self.step * self.global_batch)
                    metrics["img_per_s"] = (self.step - step_log) * self.global_batch / max(now - t_log, 1e-9)
                    self.sinks.write(self.step, metrics)
                    self.meter.reset()
                    t_log, step_log = now, self.step
                if self.evaluator is not None and self.evaluator.due(self.step):  # before the checkpoint records it
                    dt = self._evaluate(bar)
                    eval_s, t_log = eval_s + dt, t_log + dt
                if tc.save_interval > 0 and self.step % tc.save_interval == 0:
                    self.save()
                if tc.sample_every > 0 and self.step % tc.sample_every == 0:
                    self.sample_grid()
            if self.evaluator is not None and reason != "signal" and self.evaluator.due(self.step, final=True):
                eval_s += self._evaluate(bar)  # the end of the run too (not after a signal: stop quickly)
            if self._last_saved_step != self.step:
                self.save()
        except KeyboardInterrupt:
            last = self.last_checkpoint or (f"step {self._last_saved_step}" if self._last_saved_step else "none")
            raise TrainingAborted(f"aborted by Ctrl-C without saving at step {self.step}; the last "
                                  f"checkpoint is {last} and the steps after it are lost") from None
        finally:
            bar.close()
            self.sinks.close()
            self.signals.restore()
        seconds = time.perf_counter() - t0
        ips = (self.step - start_step) * self.global_batch / (seconds - eval_s) if seconds > eval_s else 0.0
        return TrainResult(self.step, reason, self.last_checkpoint, ips, seconds, start_step=start_step,
                           eval_seconds=eval_s)

    def _evaluate(self, bar: ProgressBar) -> float:
        """Run the periodic evaluation (every rank: the sampling is shared) and return its seconds.  The bar's
        clock is moved on by them (its img/s and time left count training only) and it shows the last FID."""
        t = time.perf_counter()
        note = self.evaluator.run(self)
        dt = time.perf_counter() - t
        bar._t0 += dt  # ProgressBar has no pause(); its rate and "left" are measured from _t0
        if note:
            bar.bar.set_description(note, refresh=False)
        return dt

    # ------------------------------------------------------------------------------------------
    # sample grids
    # ------------------------------------------------------------------------------------------
    def ema_model(self, index: int = 0) -> torch.nn.Module:
        """A copy of the network holding EMA ``index``'s weights (eval mode), reused between calls."""
        if self._sample_model is None:
            self._sample_model = copy.deepcopy(self.model).eval()
            for p in self._sample_model.parameters():
                p.requires_grad_(False)
        self.ema.copy_to(self._sample_model, index)
        return self._sample_model

    def sample_grid(self, num_samples: int | None = None) -> Path | None:
        """Write ``RUN_DIR/samples/step_XXXXXXXX.png`` from the first EMA (rank 0; fixed seed)."""
        if not self.dist.is_main or self.run_dir is None or self.sample_diffusion is None:
            return None
        m = self.cfg.model
        if num_samples is None:
            num_samples = 64 if m.image_size <= 32 else 16
        model = self.ema_model(0)
        kwargs_fn = None
        if self.grid_low_res is not None:
            low = self.grid_low_res
            num_samples = min(num_samples, low.shape[0])

            def kwargs_fn(idx):
                return {"low_res": low[torch.from_numpy(idx)]}

        result = generate(
            model, self.sample_diffusion, num_samples=num_samples, batch_size=num_samples,
            image_shape=(m.in_channels, m.image_size, m.image_size), seed=self.tcfg.seed,
            use_ddim=self.sample_ddim, classes="balanced" if m.class_cond else None,
            num_classes=m.num_classes if m.class_cond else None, model_kwargs_fn=kwargs_fn,
            device=self.device, progress=False,
        )
        path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        save_grid(result.images, path, nrow=int(math.ceil(math.sqrt(num_samples))))
        return path
