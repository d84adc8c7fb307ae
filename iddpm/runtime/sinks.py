"""Where metrics go: a progress bar, a CSV file, TensorBoard.  All are objects passed to the trainer.

A sink receives ``write(step, {name: float})`` once per logging interval and ``close()`` at the end.
Non-main ranks get an empty :class:`MultiSink` and a disabled :class:`ProgressBar`.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from pathlib import Path
from typing import Protocol

from tqdm import tqdm


class MetricSink(Protocol):
    def write(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class CSVSink:
    """``metrics.csv`` with one row per logging interval; columns grow as new metric names appear.

    On resume (``resume_step`` given) rows of steps after ``resume_step`` are dropped, so the file
    matches the run that continues from the checkpoint.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.columns: list[str] = ["step"]
        self.rows: list[dict[str, str]] = []
        if self.path.is_file() and resume_step is not None:
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= resume_step]
            self._rewrite()
        elif self.path.exists():
            self.path.unlink()

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, restval="")
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": str(step), **{k: repr(float(v)) for k, v in metrics.items()}}
        new = [k for k in row if k not in self.columns]
        self.rows.append(row)
        if new:
            self.columns += sorted(new)
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, restval="").writerow(row)

    def close(self) -> None:
        pass


class TensorBoardSink:
    """Scalars under ``log_dir`` (``RUN_DIR/tb``); :meth:`create` returns None when TensorBoard is missing."""

    def __init__(self, writer) -> None:
        self.writer = writer

    @classmethod
    def create(cls, log_dir: str | os.PathLike, resume_step: int | None = None) -> TensorBoardSink | None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # why: optional dependency, and slow to import
        except Exception:  # tensorboard not installed (optional dependency)
            return None
        purge = resume_step + 1 if resume_step is not None else None
        return cls(SummaryWriter(log_dir=str(log_dir), purge_step=purge))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, float(v), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class ConsoleSink:
    """One compact line per logging interval (printed above the progress bar)."""

    KEYS = ("loss", "mse", "vb", "grad_norm", "lr", "img_per_s")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        parts = [f"step {step}"] + [f"{k} {metrics[k]:.4g}" for k in self.KEYS if k in metrics]
        tqdm.write(" | ".join(parts), file=sys.stderr)

    def close(self) -> None:
        pass


class MultiSink:
    """Fan out to several sinks (possibly none)."""

    def __init__(self, sinks: list[MetricSink] | None = None) -> None:
        self.sinks = list(sinks or [])

    def write(self, step: int, metrics: dict[str, float]) -> None:
        for s in self.sinks:
            s.write(step, metrics)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


class ProgressBar:
    """tqdm bar over optimizer steps showing step, img/s, ETA and loss (disabled off rank 0).

    ``total`` may be None (no step limit): then there is no ETA, but with ``seconds_budget``
    (``--max_minutes``) the time left is shown.
    """

    def __init__(self, total: int | None, initial: int, images_per_step: int, enabled: bool = True,
                 seconds_budget: float | None = None) -> None:
        self.images_per_step = images_per_step
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                        file=sys.stderr, smoothing=0.05, desc="train", mininterval=0.5 if sys.stderr.isatty() else 5.0)
        self._t0 = time.perf_counter()
        self._n0 = initial
        self.seconds_budget = seconds_budget  # a time limit: the postfix shows the time left

    def update(self, step: int, loss: float | None = None) -> None:
        self.bar.update(step - self.bar.n)
        elapsed = time.perf_counter() - self._t0
        ips = (step - self._n0) * self.images_per_step / elapsed if elapsed > 0 else 0.0
        post = {"img/s": f"{ips:.1f}"}
        if self.seconds_budget:
            left = max(0.0, self.seconds_budget - elapsed)
            post["left"] = f"{int(left // 60)}:{int(left % 60):02d}"
        if loss is not None and math.isfinite(loss):
            post["loss"] = f"{loss:.4f}"
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        self.bar.close()


def make_sinks(run_dir: str | os.PathLike | None, enabled: bool, resume_step: int | None = None,
               console: bool = True, tensorboard: bool = True) -> MultiSink:
    """Console + ``metrics.csv`` + TensorBoard (when importable) under ``run_dir``; none when not ``enabled``."""
    if not enabled:
        return MultiSink()
    sinks: list[MetricSink] = [ConsoleSink()] if console else []
    if run_dir is not None:
        sinks.append(CSVSink(Path(run_dir) / "metrics.csv", resume_step=resume_step))
        if tensorboard:
            tb = TensorBoardSink.create(Path(run_dir) / "tb", resume_step=resume_step)
            if tb is not None:
                sinks.append(tb)
    return MultiSink(sinks)
