"""What watches a training run besides the step itself: which checkpoint is still good, fp16 loss-scale collapse,
and stop signals.  The trainer feeds them plain numbers; they hold no tensors.

**Good checkpoints** (:class:`CheckpointHealth`).  A step's loss is *sane* when it is finite and at most
``LOSS_FACTOR`` (100) times the median of the last ``HISTORY`` (200) sane losses (any finite loss while there are
none).  Checkpoint ``step_k`` holds the weights after update ``k``: the loss of step ``k`` drove that update and
the loss of step ``k + 1`` is the first one computed *with* those weights, so ``step_k`` is good when both are sane.
Its verdict is therefore known one step after it is written (and, for the last checkpoint of a run, one step
after a resume: the state travels in ``state.json``).  Why 100x the median: the diffusion losses of a healthy run
fall from about 1 (an eps-prediction that outputs zeros has MSE 1) and wander within a few times their median
from batch to batch, while a run that blows up passes 1e3..1e11 before NaN; the median of the *sane* losses is
not dragged up by the explosion itself.

**fp16 collapse** (:class:`LossScaleGuard`).  Under fp16 a step whose gradients overflow is skipped and the loss
scale halves.  A healthy run skips at most ~20 steps while the scale settles from 2**20 and then about one in
``1 / fp16_scale_growth`` (1000) steps, so the run is stopped when (a) the loss itself was NaN/inf on
``NONFINITE_STEPS`` (8) consecutive steps (the forward pass is broken; skipping leaves the weights as they are,
so no scale can repair it), (b) ``MAX_SKIPPED`` (24) of the last ``SKIP_WINDOW`` (32) steps were skipped, or
(c) the scale fell below ``MIN_SCALE`` (2**-10: 1024 times *less* than no scaling at all; gradients of an O(1)
loss need no shrinking).
"""

from __future__ import annotations

import math
import signal
import statistics
import sys
import threading
from collections import deque
from pathlib import Path

LOSS_FACTOR = 100.0
HISTORY = 200
NONFINITE_STEPS = 8
SKIP_WINDOW = 32
MAX_SKIPPED = 24
MIN_SCALE = 2.0 ** -10


def _num(v: float | None) -> float | str | None:
    return v if v is None or math.isfinite(v) else str(v)


def _worse(a: tuple[float, int], b: tuple[float, int]) -> tuple[float, int]:
    """Of two ``(loss, step)``: the non-finite one, else the larger."""
    if not math.isfinite(a[0]):
        return a
    if not math.isfinite(b[0]):
        return b
    return a if a[0] >= b[0] else b


class CheckpointHealth:
    """Tracks the last checkpoint whose losses were finite and sane (see the module docstring)."""

    def __init__(self) -> None:
        self.history: deque[float] = deque(maxlen=HISTORY)
        self.last_good: dict | None = None  # {"step", "path"}
        self.pending: dict | None = None  # newest checkpoint, verdict not known yet: {"step", "path", "sane", "loss"}
        self.untrusted: list[dict] = []  # checkpoints after last_good judged bad: {"step", "path", "loss", "at"}
        self.last_loss: float | None = None
        self.last_ok = True  # whether last_loss was sane (True before any step)

    def sane(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return False
        return not self.history or loss <= LOSS_FACTOR * statistics.median(self.history)

    def observe(self, loss: float) -> bool:
        """Record one step's loss; judges the pending checkpoint.  Returns whether the loss was sane."""
        ok = self.sane(loss)
        if ok:
            self.history.append(float(loss))
        self.last_loss, self.last_ok = float(loss), ok
        if self.pending is not None:
            p, self.pending = self.pending, None
            if p["sane"] and ok:
                self.last_good, self.untrusted = {"step": p["step"], "path": p["path"]}, []
            else:
                nxt = (self.last_loss, p["step"] + 1)  # the loss of the checkpoint's own weights
                loss_at = nxt if p["sane"] or p["loss"] is None else _worse((p["loss"], p["step"]), nxt)
                self.untrusted.append({"step": p["step"], "path": p["path"], "loss": loss_at[0], "at": loss_at[1]})
        return ok

    def on_save(self, step: int, path: str | Path | None) -> None:
        """A checkpoint of ``step`` was written; its verdict comes with the next loss."""
        if path is None:
            return
        self.pending = {"step": int(step), "path": str(path), "sane": self.last_ok, "loss": self.last_loss}

    def describe(self) -> str:
        """One sentence naming the last good checkpoint and the ones after it not to be trusted."""
        good = self.last_good["path"] if self.last_good else "none"
        if self.last_good and not Path(good).exists():
            good += " (no longer on disk)"
        text = f"Last good checkpoint: {good}"
        if self.untrusted:
            one = len(self.untrusted) == 1
            names = ", ".join(Path(u["path"]).name for u in self.untrusted)
            finite = [(u["loss"], u["at"]) for u in self.untrusted if math.isfinite(u["loss"])]
            bad = [u["at"] for u in self.untrusted if not math.isfinite(u["loss"])]
            parts = [f"{max(finite)[0]:.3g} at step {max(finite)[1]}"] if finite else []
            parts += [f"NaN/inf at step {min(bad)}"] if bad else []
            text += (f" ({names} {'was' if one else 'were'} saved as the loss left its normal range (loss "
                     f"{', '.join(parts)}): do not resume from {'it' if one else 'them'})")
        return text

    def protected_step(self) -> int | None:
        """The step folder pruning must keep (the last good one)."""
        return self.last_good["step"] if self.last_good else None

    def state_dict(self) -> dict:
        """JSON-able (non-finite losses as the strings ``"nan"`` / ``"inf"``, which ``float()`` reads back)."""
        untrusted = [dict(u, loss=_num(u["loss"])) for u in self.untrusted]
        return {"history": list(self.history), "last_good": self.last_good, "untrusted": untrusted,
                "last_loss": _num(self.last_loss), "last_ok": self.last_ok}

    def load_state_dict(self, state: dict | None, *, resumed_step: int, resumed_path: str | Path) -> None:
        """Continue from a checkpoint's ``state["health"]``; the resumed checkpoint becomes the pending one."""
        state = state or {}
        self.history = deque((float(v) for v in state.get("history", [])), maxlen=HISTORY)
        self.last_good = state.get("last_good")
        self.untrusted = [dict(u, loss=float(u["loss"])) for u in state.get("untrusted", [])]
        last = state.get("last_loss")
        self.last_loss = None if last is None else float(last)
        self.last_ok = bool(state.get("last_ok", True))
        self.on_save(resumed_step, resumed_path)

    def resume_warning(self) -> str | None:
        """When the checkpoint just resumed from follows already-untrusted ones: what to resume from instead."""
        if not self.untrusted:
            return None
        good = self.last_good["path"] if self.last_good else None
        fix = f"--resume_checkpoint {good}" if good else "a new --run_dir"
        return (f"warning: {Path(self.untrusted[-1]['path']).name} and later were saved after the loss left its "
                f"normal range; this run may continue exploded weights (consider {fix})")


class LossScaleGuard:
    """fp16: stops a run whose loss scaling collapsed (see the module docstring)."""

    def __init__(self) -> None:
        self.skipped: deque[bool] = deque(maxlen=SKIP_WINDOW)
        self.nonfinite = 0

    def update(self, step: int, stepped: bool, loss_finite: bool, scale: float) -> str | None:
        """Record one step; returns the reason to stop (one sentence) or None."""
        self.skipped.append(not stepped)
        self.nonfinite = 0 if loss_finite else self.nonfinite + 1
        n, k = len(self.skipped), sum(self.skipped)
        why = None
        if self.nonfinite >= NONFINITE_STEPS:
            why = (f"the loss was NaN/inf on the last {self.nonfinite} steps, so the weights no longer give a finite "
                   "forward pass and skipping steps cannot repair that")
        elif k >= MAX_SKIPPED:
            why = "gradients overflowed at every scale tried"
        elif scale < MIN_SCALE:
            why = f"the scale fell below 2^{math.log2(MIN_SCALE):.0f}"
        if why is None:
            return None
        return (f"fp16 loss scaling collapsed at step {step}: {k} of the last {n} steps were skipped, loss scale "
                f"2^{math.log2(scale):.0f}; {why}")


class StopSignals:
    """SIGINT / SIGTERM handling of a run (main thread only): the first asks the loop to stop after the step in
    progress and write its checkpoint; a second Ctrl-C only says it is still doing so; a third raises
    KeyboardInterrupt (the run aborts without saving)."""

    def __init__(self, announce: bool = True) -> None:
        self.requested: str | None = None
        self.interrupts = 0
        self.announce = announce
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            return
        if signum != signal.SIGINT:
            return
        self.interrupts += 1
        if self.interrupts >= 2:
            raise KeyboardInterrupt
        if self.announce:
            print("iddpm train: stopping: the step in progress finishes and its checkpoint is written; Ctrl-C "
                  "again aborts without saving", file=sys.stderr, flush=True)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)

    def restore(self) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)
        self._old = {}
