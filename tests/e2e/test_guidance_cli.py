"""``iddpm train --class_dropout`` + ``iddpm sample --guidance_scale`` on a tiny class-conditional digits model."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file

from iddpm.checkpoints.run_dir import read_config
from iddpm.cli.main import main

TINY = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
        "--attention_resolutions", "4", "--num_heads", "2", "--diffusion_steps", "40", "--noise_schedule", "cosine",
        "--learn_sigma", "True", "--class_cond", "True", "--num_classes", "10", "--batch_size", "8", "--lr", "1e-3",
        "--log_interval", "1", "--no_progress"]


def _weights(run, step):
    return load_file(str(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def test_train_with_label_dropout_then_guided_sampling(tmp_path, capsys):
    """3 steps, not 2: the zero-initialised output convolutions stop gradients reaching the label embedding in the
    first two updates, so after 2 steps the labels do not change the output yet and guidance would be a no-op."""
    torch.set_num_threads(1)
    run = tmp_path / "run"
    assert main(["train", *TINY, "--class_dropout", "0.2", "--run_dir", str(run), "--max_steps", "3"]) == 0
    assert read_config(run).model.class_dropout == 0.2
    assert _weights(run, 3)["label_emb.weight"].shape == (11, 128)  # the "no label" row
    out, plain = tmp_path / "guided", tmp_path / "plain"
    args = ["sample", "--run", str(run), "--num_samples", "10", "--balanced", "--timestep_respacing", "8", "--quiet",
            "--no_ema"]  # the raw weights: after 3 steps the EMA (0.999) still holds the initial ones
    assert main([*args, "--guidance_scale", "2", "--out", str(out)]) == 0
    assert main([*args, "--out", str(plain)]) == 0
    with np.load(out / "samples_10x8x8x1.npz") as z, np.load(plain / "samples_10x8x8x1.npz") as p:
        assert z["arr_1"].tolist() == list(range(10))  # the requested labels, not the null label
        assert z["arr_0"].shape == (10, 8, 8, 1) and not np.array_equal(z["arr_0"], p["arr_0"])
    assert json.loads((out / "sample_info.json").read_text())["guidance_scale"] == 2.0
    capsys.readouterr()
    # a model trained without dropout refuses guidance in one line, naming the flag
    bare = tmp_path / "bare"
    assert main(["train", *TINY, "--run_dir", str(bare), "--max_steps", "1"]) == 0
    capsys.readouterr()
    assert main(["sample", "--run", str(bare), "--guidance_scale", "3", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--guidance_scale 3: the model was trained without label dropout" in err[0]


def test_resume_with_label_dropout_is_exact(tmp_path):
    """The dropped labels are drawn per (seed, step, position): 2 steps + resume + 1 step = 3 steps straight."""
    torch.set_num_threads(1)
    straight, split = tmp_path / "straight", tmp_path / "split"
    flags = [*TINY, "--class_dropout", "0.5", "--save_interval", "1"]
    assert main(["train", *flags, "--run_dir", str(straight), "--max_steps", "3"]) == 0
    assert main(["train", *flags, "--run_dir", str(split), "--max_steps", "2"]) == 0
    assert main(["train", "--resume", "--run_dir", str(split), "--max_steps", "3", "--no_progress"]) == 0
    a, b = _weights(straight, 3), _weights(split, 3)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the dropout took part: the null row moved in the third update, the first whose gradient reaches the
    # label embedding (Adam leaves a row without gradient where it is)
    assert not torch.equal(_weights(straight, 2)["label_emb.weight"][10], a["label_emb.weight"][10])
