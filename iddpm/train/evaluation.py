"""Sample quality measured while training: :func:`prepare_evaluation` and :class:`PeriodicEvaluator`.

Every ``--eval_every`` N optimizer steps, and once at the end of a run that was not stopped by a signal, the
trainer calls the evaluator at the step boundary (before that step's checkpoint, so the checkpoint records the
evaluation).  For each EMA rate it draws ``--eval_samples`` K images with ``--eval_sampler`` / ``--eval_steps``:
every process samples its share (batch b of ``--eval_batch_size`` on rank b % world_size, as ``iddpm sample``
does under torchrun) from the run's ``--seed`` -- the same noise at every evaluation, so differences between
steps are the model's -- and passes its batches through the feature network ``iddpm eval`` would choose (digits
CNN for 8x8 grayscale runs, else InceptionV3).  Rank 0 merges the shares and compares them with the cached
reference statistics (:mod:`iddpm.eval.reference`): FID with a bootstrap standard error (20 resamples of the K
sample features), KID, precision and recall.  Class-conditional runs sample balanced labels.

Results: ``RUN_DIR/eval.csv`` (one row per evaluation and EMA rate; :data:`EVAL_COLUMNS`), ``eval/*`` scalars in
``metrics.csv`` and TensorBoard, one console line per row, the first 64 samples of the first EMA as
``RUN_DIR/samples/eval_step_XXXXXXXX.png``, and the last FID in the progress bar.  ``--keep_best``:
``RUN_DIR/checkpoints/best_ema_<rate>/`` (``model.safetensors``, ``ema_<rate>.safetensors`` and a ``state.json``
with the step and its metrics), rewritten atomically whenever that rate's FID improves; step checkpoints name it
in ``state.json`` under ``eval.best``; ``--keep_last`` pruning only touches ``step_*`` folders.

Resume: ``eval.csv`` rows after the checkpoint's step are dropped (the resumed run evaluates those steps again, with
the same weights, so the same numbers), the best FID so far comes from the checkpoint, and a best folder that the
checkpoint does not name (written after it) is removed -- the next evaluation writes a new one.
"""

from __future__ import annotations

import copy
import csv
import inspect
import io
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from iddpm.build import build_diffusion, build_sampling_diffusion
from iddpm.checkpoints.model_file import save_model_file
from iddpm.checkpoints.run_dir import CHECKPOINTS, STATE_FORMAT, ema_filename
from iddpm.config import ConfigError, RunConfig
from iddpm.diffusion import SOLVERS
from iddpm.eval.features import make_extractor
from iddpm.eval.reference import Reference, describe_source, extractor_for, load_or_compute_reference
from iddpm.eval.report import read_eval_csv
from iddpm.models import optimize
from iddpm.runtime.atomic import atomic_directory, atomic_write_text
from iddpm.runtime.sinks import ConsoleSink, MultiSink
from iddpm.sample import gather_results, generate, save_grid

__all__ = ["EVAL_CSV", "EVAL_COLUMNS", "BEST_PREFIX", "EvalSetup", "PeriodicEvaluator", "known_samplers",
           "prepare_evaluation", "save_best_checkpoint"]

EVAL_CSV = "eval.csv"
EVAL_COLUMNS = ("step", "ema_rate", "sampler", "steps", "num_samples", "fid", "fid_se", "kid", "kid_std",
                "precision", "recall", "seconds", "wall_time")
BEST_PREFIX = "best_ema_"
_METRICS = ("fid", "fid_se", "kid", "kid_std", "precision", "recall")


def known_samplers() -> tuple[str, ...]:
    """``ancestral`` and ``ddim``, plus the few-step solvers of :data:`iddpm.diffusion.SOLVERS` when
    :func:`iddpm.sample.generate` takes ``sampler=``."""
    solvers = tuple(SOLVERS) if "sampler" in inspect.signature(generate).parameters else ()
    return ("ancestral", "ddim", *solvers)


@dataclass(frozen=True)
class EvalSetup:
    """What an evaluation needs that can fail, built at the start of a run (one-line ConfigErrors there).

    diffusion: what the sampler steps (respaced to ``--eval_steps`` for ancestral / DDIM; the full T-step
    diffusion for a solver).  method: the keywords of :func:`iddpm.sample.generate` that choose the loop.
    extractor: the feature network; extractor_id: what identifies its weights beyond its name.
    """

    diffusion: Any
    method: dict
    extractor: Any
    extractor_id: str


def prepare_evaluation(cfg: RunConfig, device: torch.device) -> EvalSetup | None:
    """The :class:`EvalSetup` of ``cfg`` (None without ``--eval_every``); refuses, in one line, an unknown
    sampler, more steps than the diffusion has, super-resolution runs and a missing feature network."""
    tc, m = cfg.train, cfg.model
    if tc.eval_every <= 0:
        return None
    if m.super_res:
        raise ConfigError("--eval_every: not for super-resolution runs (their samples need low-resolution inputs); "
                          "evaluate checkpoints with `iddpm upsample` and `iddpm eval`")
    names = known_samplers()
    if tc.eval_sampler not in names:
        raise ConfigError(f"--eval_sampler {tc.eval_sampler!r}: unknown; choose one of {', '.join(names)}")
    T = cfg.diffusion.diffusion_steps
    if tc.eval_steps > T:
        raise ConfigError(f"--eval_steps {tc.eval_steps}: more than the run's {T} diffusion steps; use at most {T}")
    if tc.eval_sampler in ("ancestral", "ddim"):  # the diffusion's own loops over N evenly spaced steps
        diffusion = build_sampling_diffusion(cfg, str(tc.eval_steps))
        method: dict = {"use_ddim": tc.eval_sampler == "ddim"}
    else:  # a solver: the full diffusion, N model evaluations on the solver's own grid
        diffusion = build_diffusion(cfg.diffusion, "")
        method = {"sampler": tc.eval_sampler, "steps": tc.eval_steps}
    shape = (m.image_size, m.image_size, m.in_channels)
    describe_source(tc.eval_ref, cfg.data, shape)  # a reference that does not exist is refused now
    name = extractor_for(tc.eval_ref, shape)
    extractor = make_extractor(name, device=device)
    return EvalSetup(diffusion, method, extractor, str(getattr(extractor, "path", "")))


def _finite(x) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def save_best_checkpoint(run_dir: str | Path, rate: float, step: int, cfg: RunConfig, model_state: dict,
                         ema_state: dict, metrics: dict) -> Path:
    """Write ``RUN_DIR/checkpoints/best_ema_<rate>/`` atomically (the raw weights, EMA ``rate``'s and a
    ``state.json`` with the step and ``metrics``); returns the folder."""
    final = Path(run_dir) / CHECKPOINTS / f"{BEST_PREFIX}{float(rate)}"
    meta = {"iddpm_step": str(step), "iddpm_best_fid": repr(float(metrics["fid"]))}
    with atomic_directory(final) as tmp:
        save_model_file(tmp / "model.safetensors", model_state, cfg, extra_metadata=meta)
        save_model_file(tmp / ema_filename(rate), ema_state, cfg, extra_metadata={**meta, "iddpm_ema_rate": str(rate)})
        best = {"ema_rate": float(rate), **{k: _finite(metrics.get(k)) for k in _METRICS},
                **{k: metrics[k] for k in ("sampler", "steps", "num_samples")}}
        body = {"format": STATE_FORMAT, "step": step, "best": best, "config": cfg.to_dict()}
        atomic_write_text(tmp / "state.json", json.dumps(body, indent=1) + "\n")
    return final


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=EVAL_COLUMNS, restval="", extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _say(text: str) -> None:
    tqdm.write(text, file=sys.stderr)


class PeriodicEvaluator:
    """Evaluates every EMA of a :class:`~iddpm.train.trainer.Trainer` every ``--eval_every`` steps (see the module
    docstring).  Built on every rank (sampling and feature extraction are shared); rank 0 computes the reference
    statistics at construction (errors reach every rank), the metrics, and writes every file.

    resume_state / resume_step: the checkpoint's ``state["eval"]`` and step when the run continues one (None for a
    fresh run, which removes an earlier ``eval.csv`` and best folders of the same run directory).
    """

    def __init__(self, cfg: RunConfig, setup: EvalSetup, *, run_dir: str | Path, dist, resume_state: dict | None = None,
                 resume_step: int | None = None) -> None:
        tc, m = cfg.train, cfg.model
        self.cfg, self.setup, self.dist, self.run_dir = cfg, setup, dist, Path(run_dir)
        self.every, self.num_samples, self.batch_size = tc.eval_every, tc.eval_samples, tc.eval_batch_size
        self.keep_best, self.seed = tc.keep_best, tc.seed
        self.image_shape = (m.in_channels, m.image_size, m.image_size)
        self.settings = {"sampler": tc.eval_sampler, "steps": tc.eval_steps, "num_samples": tc.eval_samples,
                         "ref": tc.eval_ref, "extractor": setup.extractor.name}
        self.csv_path = self.run_dir / EVAL_CSV
        self.last_step = 0
        self.best: dict[str, dict] = {}
        self._net: torch.nn.Module | None = None
        self._run_net: torch.nn.Module | None = None
        self.reference = self._reference(cfg)
        self._restore(resume_state, resume_step)

    # ------------------------------------------------------------------------------------------
    # start
    # ------------------------------------------------------------------------------------------
    def _reference(self, cfg: RunConfig) -> Reference | None:
        """Rank 0 loads or computes the reference statistics; an error is raised on every rank."""
        ref, error = None, None
        if self.dist.is_main:
            c, h, w = self.image_shape
            try:
                ref = load_or_compute_reference(self.run_dir, cfg.train.eval_ref, cfg.data, (h, w, c),
                                                self.setup.extractor, extractor_id=self.setup.extractor_id, log=_say)
            except ConfigError as exc:
                error = str(exc)
        errors = [e for e in self.dist.all_gather_object(error) if e]
        if errors:
            raise ConfigError(errors[0])
        return ref

    def _best_folders(self) -> list[Path]:
        root = self.run_dir / CHECKPOINTS
        return sorted(p for p in root.glob(f"{BEST_PREFIX}*") if p.is_dir()) if root.is_dir() else []

    def _restore(self, state: dict | None, step: int | None) -> None:
        if step is None:  # a fresh run: nothing of an earlier one in this directory stays
            if self.dist.is_main:
                self.csv_path.unlink(missing_ok=True)
                for p in self._best_folders():
                    shutil.rmtree(p, ignore_errors=True)
            return
        state = state or {}
        self.last_step = min(int(state.get("last_step", 0)), step)
        if state.get("settings") == self.settings:
            self.best = {k: dict(v) for k, v in (state.get("best") or {}).items()}
        elif state.get("best") and self.dist.is_main:
            _say(f"eval: settings changed since the checkpoint ({state.get('settings')} -> {self.settings}); "
                 "the best FID starts again")
        if not self.dist.is_main:
            return
        rows = [r for r in read_eval_csv(self.csv_path) if int(r["step"]) <= step]
        atomic_write_text(self.csv_path, _csv_text(rows))
        if self.keep_best:
            self._reconcile_best(step)

    def _reconcile_best(self, step: int) -> None:
        """Keep only best folders that the checkpoint names (same step); forget records whose folder is gone."""
        root = self.run_dir / CHECKPOINTS
        for p in list(root.glob(f".{BEST_PREFIX}*")) if root.is_dir() else []:  # interrupted atomic writes
            shutil.rmtree(p, ignore_errors=True)
        on_disk = {}
        for p in self._best_folders():
            try:
                on_disk[p.name[len(BEST_PREFIX):]] = (p, int(json.loads((p / "state.json").read_text())["step"]))
            except (OSError, ValueError, KeyError):
                on_disk[p.name[len(BEST_PREFIX):]] = (p, -1)
        for key, (p, folder_step) in on_disk.items():
            rec = self.best.get(key)
            if rec is None or rec.get("step") != folder_step:
                _say(f"eval: removed {p} (step {folder_step}): written after the checkpoint of step {step}")
                shutil.rmtree(p, ignore_errors=True)
        for key in list(self.best):
            if key not in on_disk or self.best[key].get("step") != on_disk[key][1]:
                del self.best[key]

    def state_dict(self) -> dict:
        """What a checkpoint records: the last evaluated step, the best FID per EMA rate, the settings."""
        return {"last_step": self.last_step, "best": copy.deepcopy(self.best), "settings": dict(self.settings)}

    # ------------------------------------------------------------------------------------------
    # an evaluation
    # ------------------------------------------------------------------------------------------
    def due(self, step: int, final: bool = False) -> bool:
        """Whether to evaluate after ``step`` (every N steps; ``final``: the end of the run), once per step."""
        return step > self.last_step and (final or step % self.every == 0)

    def _network(self, trainer, index: int) -> torch.nn.Module:
        """A copy of the network (eval mode, fast path with ``--fast``) holding EMA ``index``; reused."""
        if self._net is None:
            self._net = copy.deepcopy(trainer.model).eval()
            for p in self._net.parameters():
                p.requires_grad_(False)
            self._run_net = optimize(self._net, "sample") if self.cfg.train.fast else self._net
        trainer.ema.copy_to(self._net, index)
        return self._run_net

    def _features(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray | None:
        """Features of this rank's images, one extractor call per sampling batch (the same batches whatever the
        number of processes, so the same numbers)."""
        if len(indices) == 0:
            return None
        cuts = np.flatnonzero(np.diff(indices // self.batch_size)) + 1
        return np.concatenate([np.asarray(self.setup.extractor(chunk)[0], dtype=np.float64)
                               for chunk in np.split(images, cuts)])

    def _sample(self, trainer, index: int):
        """``(images uint8 [K, H, W, C], features float64 [K, D])`` of EMA ``index`` on rank 0; (None, None)
        elsewhere.  Collective."""
        m = self.cfg.model
        part = generate(self._network(trainer, index), self.setup.diffusion, num_samples=self.num_samples,
                        batch_size=self.batch_size, image_shape=self.image_shape, seed=self.seed,
                        classes="balanced" if m.class_cond else None,
                        num_classes=m.num_classes if m.class_cond else None, device=self.dist.device,
                        progress=False, rank=self.dist.rank, world_size=self.dist.world_size, **self.setup.method)
        parts = self.dist.all_gather_object((part, self._features(part.images, part.indices)))
        if not self.dist.is_main:
            return None, None
        merged = gather_results([p for p, _ in parts])
        idx = np.concatenate([p.indices for p, f in parts if f is not None])
        feats = np.concatenate([f for _, f in parts if f is not None])
        return merged.images, feats[np.argsort(idx, kind="stable")]

    def run(self, trainer) -> str:
        """Evaluate every EMA of ``trainer`` at its current step (all ranks); returns the progress-bar note."""
        step, rows = trainer.step, []
        for i, rate in enumerate(trainer.ema.rates):
            t0 = time.perf_counter()
            images, feats = self._sample(trainer, i)
            if self.dist.is_main:
                metrics = self.reference.compare(feats, seed=self.seed, device=self.dist.device)
                row = {"step": step, "ema_rate": float(rate), "sampler": self.settings["sampler"],
                       "steps": self.settings["steps"], "num_samples": len(feats), **metrics}
                self._keep_best(trainer, i, rate, row)
                if i == 0:
                    save_grid(images[:64], self.run_dir / "samples" / f"eval_step_{step:08d}.png")
                row.update(seconds=time.perf_counter() - t0, wall_time=time.time())
                rows.append(row)
        self.last_step = step
        if self.dist.is_main:
            self._report(step, rows, trainer.sinks)
        self.dist.barrier()  # every rank leaves together: the evaluation's time is the same on all of them
        return f"train | FID {rows[0]['fid']:.3g}" if rows and math.isfinite(rows[0]["fid"]) else ""

    def _keep_best(self, trainer, index: int, rate: float, row: dict) -> None:
        key, fid = str(float(rate)), row["fid"]
        rec = self.best.get(key)
        if not math.isfinite(fid) or (rec is not None and rec["fid"] <= fid):
            return
        path = None
        if self.keep_best:
            folder = save_best_checkpoint(self.run_dir, rate, row["step"], self.cfg, trainer.model.state_dict(),
                                          trainer.ema.state_dict(trainer.model, index), row)
            path = str(folder.relative_to(self.run_dir))
        self.best[key] = {"step": row["step"], "fid": fid, "fid_se": _finite(row["fid_se"]), "path": path}

    def _report(self, step: int, rows: list[dict], sinks: MultiSink) -> None:
        """eval.csv rows, ``eval/*`` scalars (metrics.csv, TensorBoard: every sink but the console) and one console
        line per EMA rate."""
        fmt = [{k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows]
        text = _csv_text(fmt)
        if self.csv_path.is_file() and self.csv_path.stat().st_size:
            text = text.split("\n", 1)[1]
        with open(self.csv_path, "a", newline="") as f:
            f.write(text)
        scalars = {f"eval/{k}_ema_{r['ema_rate']}": r[k] for r in rows for k in _METRICS if math.isfinite(r[k])}
        scalars["eval/seconds"] = sum(r["seconds"] for r in rows)
        MultiSink([s for s in sinks.sinks if not isinstance(s, ConsoleSink)]).write(step, scalars)
        for r in rows:
            best = self.best.get(str(r["ema_rate"]), {})
            star = " (best)" if best.get("step") == step else ""
            _say(f"eval step {step} EMA {r['ema_rate']}: FID {r['fid']:.4g} +- {r['fid_se']:.2g}{star}, "
                 f"KID {r['kid']:.3g}, precision {r['precision']:.3f}, recall {r['recall']:.3f} "
                 f"({r['num_samples']} samples, {r['sampler']} {r['steps']} steps, {self.setup.extractor.name}; "
                 f"{r['seconds']:.1f} s)")
