"""torchrun with 2 CPU processes (gloo DDP): ranks stay in sync and match a 1-process run of the same global batch."""

import csv
import dataclasses
import io
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from helpers import TINY_TRAIN_FLAGS
from safetensors.torch import load_file

TINY = [*TINY_TRAIN_FLAGS, "--in_channels", "1", "--learn_sigma", "True", "--batch_size", "8", "--lr", "1e-3",
        "--class_cond", "True", "--num_classes", "10", "--max_steps", "3", "--log_interval", "1", "--ema_rate", "0.9",
        "--save_interval", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("OPENAI_LOGDIR", None)
    return env


@pytest.mark.slow
def test_two_cpu_processes_match_one(tmp_path):
    d1, d2 = tmp_path / "one", tmp_path / "two"
    cmd2 = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "-m", "iddpm", "train", *TINY, "--run_dir", str(d2)]
    cmd1 = [sys.executable, "-m", "iddpm", "train", *TINY, "--run_dir", str(d1)]
    r2 = subprocess.run(cmd2, env=_env(), capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    r1 = subprocess.run(cmd1, env=_env(), capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    state = json.loads((d2 / "checkpoints" / "step_00000003" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["global_batch"] == 8 and state["data"] == {"epoch": 0, "batch": 3}  # 3 global batches of 8
    assert len(state["param_sha1"]) == 2 and state["param_sha1"][0] == state["param_sha1"][1]  # ranks in sync
    assert sorted(p.name for p in (d2 / "checkpoints").iterdir()) == [f"step_0000000{i}" for i in (1, 2, 3)]
    ck1, ck2 = d1 / "checkpoints", d2 / "checkpoints"
    # after one step the weights agree to float32 round-off: same examples, timesteps and noise, and the DDP
    # all-reduce of the two half-batch means equals the full-batch mean
    for name in ("model.safetensors", "ema_0.9.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(ck1 / "step_00000001" / name)), load_file(str(ck2 / "step_00000001" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (name, k)
    # later steps: AdamW turns round-off in (mathematically zero) gradients of biases that feed a GroupNorm
    # into lr-sized steps, so compare the bulk of the weights and the logged losses
    a = load_file(str(ck1 / "step_00000003" / "model.safetensors"))
    b = load_file(str(ck2 / "step_00000003" / "model.safetensors"))
    close = sum(int(torch.isclose(a[k], b[k], rtol=1e-4, atol=1e-5).sum()) for k in a)
    assert close / sum(v.numel() for v in a.values()) > 0.999
    rows1, rows2 = (list(csv.DictReader(io.StringIO((d / "metrics.csv").read_text()))) for d in (d1, d2))
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == ["1", "2", "3"]
    # both ranks together see the global batch once per step (4 examples each), not 8 each
    assert [float(r["samples"]) for r in rows2] == [float(r["samples"]) for r in rows1] == [8.0, 16.0, 24.0]
    for r1, r2 in zip(rows1, rows2):  # metrics are averaged over both ranks
        for key in ("loss", "mse", "vb", "grad_norm", "samples"):
            assert float(r1[key]) == pytest.approx(float(r2[key]), rel=1e-3), (r1["step"], key)

def test_batch_must_split_over_ranks():
    from iddpm.config import ConfigError, preset
    from iddpm.train.app import check_batch

    cfg = preset("digits")
    assert check_batch(cfg, 2) == cfg.train.batch_size // 2
    with pytest.raises(ConfigError, match="divisible by the 3 processes"):
        check_batch(cfg, 3)
    # the torchrun test above: a global batch of 8 is 4 per rank; a microbatch larger than that is refused
    tiny = cfg.replace(train=dataclasses.replace(cfg.train, batch_size=8, microbatch=4))
    assert check_batch(tiny, 2) == 4
    with pytest.raises(ConfigError, match="--microbatch 4: larger than the per-process batch 2"):
        check_batch(tiny, 4)
