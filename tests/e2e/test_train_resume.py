"""Exact resume: N steps + resume + M steps gives the same weights as N + M steps straight (CPU, fixed seed)."""

import json

import pytest
import torch
from helpers import TINY_TRAIN_FLAGS
from safetensors.torch import load_file

from iddpm.cli.main import main

TINY = [*TINY_TRAIN_FLAGS, "--in_channels", "1", "--learn_sigma", "True", "--batch_size", "8", "--lr", "1e-3",
        "--log_interval", "2"]


def _files(step_dir):
    return {f.name: load_file(str(f)) for f in step_dir.glob("*.safetensors")}


@pytest.mark.parametrize("extra", [
    ["--schedule_sampler", "loss-second-moment", "--microbatch", "4", "--dropout", "0.1", "--ema_rate", "0.9,0.99",
     "--lr_anneal_steps", "10", "--warmup_steps", "2"],
])
def test_resume_is_exact(tmp_path, extra):
    torch.set_num_threads(1)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *TINY, *extra, "--run_dir", str(straight), "--max_steps", "5"]) == 0
    assert main(["train", *TINY, *extra, "--run_dir", str(split), "--max_steps", "2"]) == 0
    assert (split / "checkpoints" / "step_00000002").is_dir()
    assert main(["train", "--resume", "--run_dir", str(split), "--max_steps", "5", "--no_progress"]) == 0
    a = _files(straight / "checkpoints" / "step_00000005")
    b = _files(split / "checkpoints" / "step_00000005")
    assert sorted(a) == sorted(b) == ["ema_0.9.safetensors", "ema_0.99.safetensors", "model.safetensors",
                                      "optimizer.safetensors"]
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    sa, sb = (json.loads((d / "checkpoints" / "step_00000005" / "state.json").read_text()) for d in (straight, split))
    for key in ("step", "sampler", "data", "rng", "scaler", "optimizer"):
        assert sa[key] == sb[key], key
    assert sum(sa["sampler"]["loss_counts"]) == 5 * 8  # every example's loss reached the sampler
    # the resumed run's metrics continue the straight run's
    rows_a = (straight / "metrics.csv").read_text().splitlines()
    rows_b = (split / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows_a] == [r.split(",")[0] for r in rows_b]


def test_resume_needs_a_run_dir_with_checkpoints(tmp_path, capsys):
    assert main(["train", *TINY, "--resume", "--run_dir", str(tmp_path / "none"), "--max_steps", "1"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
