"""SIGTERM / SIGINT: the step in progress finishes, a checkpoint is written and the process exits 0."""

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import TINY_TRAIN_FLAGS

from iddpm.checkpoints.run_dir import list_checkpoints, load_checkpoint

# no attention layers (the later --attention_resolutions wins; --num_heads then has no effect): the quickest steps
TINY = [*TINY_TRAIN_FLAGS, "--in_channels", "1", "--attention_resolutions", "", "--batch_size", "4",
        "--log_interval", "1", "--save_interval", "100000"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_exits_zero(tmp_path, sig):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("OPENAI_LOGDIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "iddpm", "train", *TINY, "--run_dir", str(run)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        metrics = run / "metrics.csv"
        while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "(signal)" in err
    steps = [s for s, _ in list_checkpoints(run)]
    assert len(steps) == 1 and steps[0] >= 2
    assert load_checkpoint(run).step == steps[0]
