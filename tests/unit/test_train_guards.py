"""iddpm.train.guards: which checkpoint is still good, when fp16 loss scaling has collapsed; the folder lock
(iddpm.runtime.lock) and pruning that keeps the last good checkpoint (iddpm.checkpoints.run_dir)."""

from __future__ import annotations

import gc
import json
import math
import os

import pytest

from iddpm.checkpoints.run_dir import prune_checkpoints
from iddpm.config import ConfigError
from iddpm.runtime.lock import FolderLocked, check_unlocked, lock_folder
from iddpm.train.guards import LOSS_FACTOR, MAX_SKIPPED, MIN_SCALE, NONFINITE_STEPS, CheckpointHealth, LossScaleGuard


def _run(health: CheckpointHealth, losses, start: int = 1) -> None:
    """Every step is checkpointed (``step_N``) after its loss is seen."""
    for step, loss in enumerate(losses, start):
        health.observe(loss)
        health.on_save(step, f"step_{step}")


def test_a_checkpoint_is_good_when_its_own_and_the_next_loss_are_sane():
    h = CheckpointHealth()
    _run(h, [1.0, 0.9, 0.8])
    assert h.last_good["step"] == 2 and h.pending["step"] == 3  # step_3's verdict needs step 4's loss
    h.observe(0.9 * LOSS_FACTOR * 1.01)  # just past 100x the median (0.9): step_3 is not trusted
    assert h.last_good["step"] == 2 and [u["step"] for u in h.untrusted] == [3]
    h.on_save(4, "step_4")
    h.observe(0.7)  # step_4 was saved right after the insane loss (its update came from it)
    assert h.last_good["step"] == 2 and [u["step"] for u in h.untrusted] == [3, 4]
    h.on_save(5, "step_5")
    h.observe(0.7)  # both sane again: step_5 is good, the chain of untrusted ones ends
    assert h.last_good["step"] == 5 and h.untrusted == [] and h.protected_step() == 5


def test_the_median_ignores_the_explosion_and_any_finite_loss_starts_the_history():
    h = CheckpointHealth()
    assert h.sane(1e9) and not h.sane(math.nan) and not h.sane(math.inf)
    _run(h, [1.0, 1.0, 1.0, 1e4, 1e4, 1e4, 1e4])  # a sustained explosion does not become the new normal
    assert list(h.history) == [1.0, 1.0, 1.0] and h.last_good["step"] == 2


def test_describe_and_state_round_trip_through_json(tmp_path):
    h = CheckpointHealth()
    good = tmp_path / "step_2"
    good.mkdir()
    h.observe(1.0)
    h.on_save(1, tmp_path / "step_1")
    h.observe(1.1)
    h.on_save(2, good)
    h.observe(1.2)
    h.on_save(3, tmp_path / "step_3")
    h.observe(1.3e11)
    h.on_save(4, tmp_path / "step_4")
    h.observe(math.nan)
    text = h.describe()
    assert text == (f"Last good checkpoint: {good} (step_3, step_4 were saved as the loss left its normal range "
                    "(loss 1.3e+11 at step 4, NaN/inf at step 5): do not resume from them)")
    back = CheckpointHealth()
    back.load_state_dict(json.loads(json.dumps(h.state_dict(), allow_nan=False)), resumed_step=4,
                         resumed_path=tmp_path / "step_4")
    back.pending = None  # (the resumed checkpoint would be judged by the next loss)
    assert back.describe() == text and back.protected_step() == 2
    assert "consider --resume_checkpoint" in back.resume_warning()
    assert CheckpointHealth().describe() == "Last good checkpoint: none"


def test_fp16_guard_lets_a_healthy_run_calibrate_and_stops_a_collapsing_one():
    g = LossScaleGuard()
    scale = 2.0 ** 20
    for step in range(1, 21):  # the scale settling from 2^20 down to 1: 20 skips in a row
        scale /= 2
        assert g.update(step, False, True, scale) is None
    for step in range(21, 2000):  # then one skip in a thousand
        assert g.update(step, step % 1000 != 0, True, scale) is None

    g = LossScaleGuard()  # (b) most recent steps skipped, finite loss
    reasons = [g.update(s, False, True, 2.0 ** (20 - s)) for s in range(1, MAX_SKIPPED + 1)]
    assert reasons[:-1] == [None] * (MAX_SKIPPED - 1)
    assert reasons[-1].startswith(f"fp16 loss scaling collapsed at step {MAX_SKIPPED}: {MAX_SKIPPED} of the last "
                                  f"{MAX_SKIPPED} steps were skipped")

    g = LossScaleGuard()  # (a) a NaN forward pass
    reasons = [g.update(s, False, False, 2.0 ** 19) for s in range(1, NONFINITE_STEPS + 1)]
    assert reasons[-1] and reasons[-2] is None and "NaN/inf on the last 8 steps" in reasons[-1]

    g = LossScaleGuard()  # (c) every other step skipped: never most of the window, but the scale keeps halving
    scale, stop = 2.0 ** 20, None
    for step in range(1, 200):
        scale = scale / 2 if step % 2 else scale
        stop = g.update(step, step % 2 == 0, True, scale)
        if stop:
            break
    assert scale < MIN_SCALE and step == 61 and "16 of the last 32 steps were skipped" in stop


def test_lock_names_the_holder_and_is_free_after_release_or_loss_of_the_object(tmp_path):
    lock = lock_folder(tmp_path / "run")
    assert (tmp_path / "run" / ".lock").read_text().startswith(f"pid {os.getpid()} on host ")
    with pytest.raises(FolderLocked, match=rf"--run_dir {tmp_path / 'run'}: in use by pid {os.getpid()} on host"):
        check_unlocked(tmp_path / "run")
    with pytest.raises(FolderLocked):
        lock_folder(tmp_path / "run")
    lock.release()
    check_unlocked(tmp_path / "run")
    lock_folder(tmp_path / "run")  # dropped at once: the lock goes with the object
    gc.collect()
    check_unlocked(tmp_path / "run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="a file is in the way"):
        lock_folder(tmp_path / "file" / "out", flag="--out")


def test_pruning_keeps_the_protected_step(tmp_path):
    for s in (1, 2, 3, 4):
        d = tmp_path / "checkpoints" / f"step_{s:08d}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"")
    removed = prune_checkpoints(tmp_path, 1, keep_steps=(2, None))
    assert sorted(p.name for p in removed) == ["step_00000001", "step_00000003"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
