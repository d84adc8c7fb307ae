"""``iddpm sample`` on tiny checkpoints: the original's npz layout, seeds, classes, DDIM, outputs, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL, assert_same_images, random_weights, save_tiny_model, tiny_cfg
from PIL import Image

from iddpm.cli.main import main


def make_checkpoint(path, **kw):
    return save_tiny_model(path, tiny_cfg(**kw))


@pytest.fixture(scope="module")
def uncond(tmp_path_factory):
    """A run directory in the COMMON layout (config.json + checkpoints/step_*/{model,ema_*}.safetensors)."""
    root = tmp_path_factory.mktemp("run")
    step = root / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    make_checkpoint(step / "model.safetensors")
    make_checkpoint(step / "ema_0.9999.safetensors")
    (root / "config.json").write_text(tiny_cfg().to_json())
    return root


@pytest.fixture(scope="module")
def cond(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cond") / "cond.safetensors", class_cond=True, num_classes=10)


def sample(run, out, *extra):
    return main(["sample", "--run", str(run), "--out", str(out), "--quiet", *extra])


def test_npz_layout_grid_and_info(uncond, tmp_path, capsys):
    assert sample(uncond, tmp_path, "--num_samples", "6", "--batch_size", "4", "--timestep_respacing", "5") == 0
    npz = tmp_path / "samples_6x8x8x1.npz"
    with np.load(npz) as z:
        assert z.files == ["arr_0"]  # unconditional: no labels, like the original
        images = z["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 1)
    assert images.std() > 0
    with Image.open(tmp_path / "grid.png") as im:
        assert im.mode == "L" and im.width > 8
    info = json.loads((tmp_path / "sample_info.json").read_text())
    assert info["num_sampling_steps"] == 5 and info["timestep_respacing"] == "5" and info["seed"] == 0
    assert info["weights"].endswith("ema_0.9999.safetensors")
    assert "samples/s" in capsys.readouterr().out


def test_batch_size_does_not_change_images(uncond, tmp_path):
    common = ["--num_samples", "4", "--timestep_respacing", "6", "--seed", "3", "--grid_size", "0"]
    assert sample(uncond, tmp_path / "a", "--batch_size", "2", *common) == 0
    assert sample(uncond, tmp_path / "b", "--batch_size", "4", *common) == 0
    a = np.load(tmp_path / "a" / "samples_4x8x8x1.npz")["arr_0"]
    b = np.load(tmp_path / "b" / "samples_4x8x8x1.npz")["arr_0"]
    assert_same_images(a, b)
    assert sample(uncond, tmp_path / "c", "--batch_size", "4", *common[:-2], "--seed", "4") == 0
    assert not np.array_equal(a, np.load(tmp_path / "c" / "samples_4x8x8x1.npz")["arr_0"])


def test_class_conditional_labels(cond, tmp_path):
    assert sample(cond, tmp_path / "bal", "--num_samples", "12", "--balanced", "--timestep_respacing", "4") == 0
    with np.load(tmp_path / "bal" / "samples_12x8x8x1.npz") as z:
        assert z.files == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(z["arr_1"], np.arange(12) % 10)
        assert z["arr_1"].dtype == np.int64
    assert sample(cond, tmp_path / "k", "--num_samples", "3", "--class", "7", "--timestep_respacing", "4") == 0
    np.testing.assert_array_equal(np.load(tmp_path / "k" / "samples_3x8x8x1.npz")["arr_1"], [7, 7, 7])
    assert sample(cond, tmp_path / "r", "--num_samples", "5", "--timestep_respacing", "4") == 0
    labels = np.load(tmp_path / "r" / "samples_5x8x8x1.npz")["arr_1"]
    assert labels.shape == (5,) and labels.min() >= 0 and labels.max() < 10


def test_ddim_is_deterministic_given_x_T_and_writes_trajectory(uncond, tmp_path):
    base = ["--num_samples", "3", "--timestep_respacing", "ddim5", "--use_ddim", "--grid_size", "0"]
    assert sample(uncond, tmp_path / "a", *base, "--trajectory", "strip", "--save_pngs") == 0
    assert sample(uncond, tmp_path / "b", *base, "--use_ddim", "True", "--eta", "0", "--fast", "false") == 0
    a = np.load(tmp_path / "a" / "samples_3x8x8x1.npz")["arr_0"]
    b = np.load(tmp_path / "b" / "samples_3x8x8x1.npz")["arr_0"]
    assert_same_images(a, b)
    assert (tmp_path / "a" / "trajectory.png").is_file()
    assert sorted(p.name for p in (tmp_path / "a" / "pngs").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert sample(uncond, tmp_path / "g", *base, "--trajectory", "gif") == 0
    with Image.open(tmp_path / "g" / "trajectory.gif") as im:
        assert im.n_frames > 1


def test_raw_weights_flag(uncond, tmp_path):
    assert sample(uncond, tmp_path, "--num_samples", "1", "--timestep_respacing", "2", "--no_ema") == 0
    assert json.loads((tmp_path / "sample_info.json").read_text())["weights"].endswith("model.safetensors")


@pytest.mark.parametrize("args,message", [
    (["--timestep_respacing", "ddim8"], "--timestep_respacing ddim8: 20 steps cannot be strided"),
    (["--class", "3"], "not class-conditional"),
    (["--num_channels", "64"], "--num_channels"),
    (["--eta", "0.5"], "--eta 0.5: only used with --use_ddim"),
    (["--batch_size", "0"], "--batch_size 0"),
])
def test_errors_are_one_line(uncond, tmp_path, capsys, args, message):
    assert sample(uncond, tmp_path, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iddpm sample: error:") and message in err[0]


def test_missing_run_and_pt_without_preset(tmp_path, capsys):
    assert sample(tmp_path / "missing", tmp_path) == 2
    assert "no such file or directory" in capsys.readouterr().err
    pt = tmp_path / "orig.pt"
    torch.save({"w": torch.zeros(1)}, pt)
    assert sample(pt, tmp_path) == 2
    assert "add --preset" in capsys.readouterr().err


def test_original_pt_with_flags(tmp_path):
    cfg = tiny_cfg()
    pt = tmp_path / "orig.pt"
    torch.save(random_weights(cfg, 1), pt)
    flags = [x for k, v in TINY_MODEL.items() for x in (f"--{k}", str(v))]
    assert sample(pt, tmp_path / "o", "--num_samples", "2", "--timestep_respacing", "3", *flags) == 0
    assert np.load(tmp_path / "o" / "samples_2x8x8x1.npz")["arr_0"].shape == (2, 8, 8, 1)


def test_module_entry_point(uncond, tmp_path):
    out = subprocess.run([sys.executable, "-m", "iddpm", "sample", "--run", str(uncond), "--out", str(tmp_path),
                          "--num_samples", "2", "--timestep_respacing", "2", "--quiet"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "samples_2x8x8x1.npz").is_file()


@pytest.mark.slow
def test_run_directory_written_by_the_trainer(tmp_path, capsys):
    """train (3 steps) -> sample / nll read the run directory alone (config from the checkpoint)."""
    run_dir = tmp_path / "run"
    assert main(["train", "--preset", "digits", "--num_channels", "32", "--num_res_blocks", "1",
                 "--diffusion_steps", "30", "--batch_size", "4", "--max_steps", "2", "--save_interval", "2",
                 "--ema_rate", "0.9999,0.99", "--run_dir", str(run_dir), "--log_interval", "1"]) == 0
    capsys.readouterr()
    assert sample(run_dir, tmp_path / "s", "--num_samples", "3", "--timestep_respacing", "ddim5", "--use_ddim") == 0
    assert "step_00000002/ema_0.9999.safetensors" in capsys.readouterr().out
    assert np.load(tmp_path / "s" / "samples_3x8x8x1.npz")["arr_0"].shape == (3, 8, 8, 1)
    assert main(["nll", "--run", str(run_dir), "--num_examples", "4", "--timestep_respacing", "3",
                 "--out", str(tmp_path / "n.json"), "--quiet", "--no_ema"]) == 0
    assert "step_00000002/model.safetensors" in capsys.readouterr().out
    assert json.loads((tmp_path / "n.json").read_text())["num_examples"] == 4


def test_npz_is_read_back_by_eval(cond, tmp_path, capsys):
    """`iddpm eval` reads the npz `iddpm sample` wrote (and iddpm.api.evaluate gives the same numbers)."""
    from iddpm import api

    assert sample(cond, tmp_path, "--num_samples", "20", "--balanced", "--timestep_respacing", "3") == 0
    npz = tmp_path / "samples_20x8x8x1.npz"
    out = tmp_path / "eval.json"
    assert main(["eval", str(npz), str(npz), "--extractor", "random", "--metrics", "fid", "--json", str(out),
                 "--no_progress"]) == 0
    same = json.loads(out.read_text())
    assert same["num_samples"] == 20 and abs(same["fid"]) < 1e-6  # identical sets
    res = api.evaluate(str(npz), "digits-test", extractor="random", metrics=("fid",))
    assert res["num_samples"] == 20 and res["num_reference"] == 360 and res["fid"] > 0


@pytest.mark.slow
def test_torchrun_two_processes_give_the_single_process_images(cond, tmp_path):
    """2 CPU processes (gloo) deal the batches round-robin; rank 0 writes the same npz as one process."""
    common = ["--model_path", str(cond), "--num_samples", "7", "--batch_size", "2", "--balanced",
              "--timestep_respacing", "4", "--quiet", "--device", "cpu", "--fast", "false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "iddpm",
           "sample", *common, "--out", str(tmp_path / "dist")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert main(["sample", *common, "--out", str(tmp_path / "one")]) == 0
    a = np.load(tmp_path / "dist" / "samples_7x8x8x1.npz")
    b = np.load(tmp_path / "one" / "samples_7x8x8x1.npz")
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])  # same batch shapes on both sides: bit-identical
