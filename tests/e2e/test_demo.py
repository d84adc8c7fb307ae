"""``iddpm demo`` end to end with a tiny budget: trains, writes the grid and the npz, prints the test NLL."""

import json

import numpy as np
import torch
from PIL import Image

from iddpm.checkpoints.run_dir import read_config
from iddpm.cli.main import main

FAST = ["--minutes", "0.02", "--num_res_blocks", "1", "--diffusion_steps", "20", "--nll_examples", "4",
        "--num_samples", "6", "--sample_steps", "5", "--eval_samples", "6", "--no_progress"]


def test_demo_tiny(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the demo's --threads must not leak
    run = tmp_path / "demo"
    assert main(["demo", *FAST, "--run_dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"samples: {run / 'samples.png'} (6 images, 5 sampling steps" in out
    assert "bits/dim over a subset: the first 4 of 360 test images (T = 20, unconditional)" in out
    assert "time:" in out
    assert "sample quality: digit-FID " in out and "vs the 360 test digits" in out and "6 samples" in out
    assert "at step" in out and (run / "eval.csv").is_file()  # the final evaluation of the training run
    assert Image.open(run / "samples.png").size[0] > 6 * 8
    assert np.load(run / "samples.npz")["arr_0"].shape == (6, 8, 8, 1)
    nll = json.loads((run / "nll.json").read_text())
    assert nll["num_examples"] == 4 and 0 < nll["bpd"] < 20
    cfg = read_config(run)
    assert cfg.preset == "digits" and cfg.model.num_channels == 32 and cfg.train.ema_rate == "0.995"
    # running it again replaces the earlier demo; a folder that is not a demo is refused
    assert main(["demo", *FAST, "--run_dir", str(run)]) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert main(["demo", *FAST, "--run_dir", str(other)]) == 2
    assert "not an earlier demo run" in capsys.readouterr().err
