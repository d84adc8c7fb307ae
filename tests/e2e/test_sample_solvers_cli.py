"""``iddpm sample / upsample --sampler S --steps N [--schedule G]`` on tiny checkpoints: outputs, info, NFE line,
batch-size invariance, trajectories and one-line errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import assert_same_images, random_weights

from iddpm.checkpoints.model_file import save_model_file
from iddpm.cli.main import main
from iddpm.config import RunConfig, apply_overrides
from iddpm.sample import save_npz

# 8x8, one channel, learned sigmas, 20 cosine steps with rescaled timesteps (as the digits runs).
TINY = dict(image_size=8, in_channels=1, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="4", learn_sigma=True, diffusion_steps=20, noise_schedule="cosine",
            rescale_timesteps=True)


def checkpoint(path, **overrides):
    cfg = apply_overrides(RunConfig(), dict(TINY, **overrides)).validate()
    return save_model_file(path, random_weights(cfg), cfg)


@pytest.fixture(scope="module")
def uncond(tmp_path_factory):
    return checkpoint(tmp_path_factory.mktemp("uncond") / "model.safetensors")


def sample(run, out, *extra):
    return main(["sample", "--run", str(run), "--out", str(out), "--quiet", *extra])


def images(folder, n, shape="8x8x1"):
    with np.load(folder / f"samples_{n}x{shape}.npz") as z:
        return {k: z[k] for k in z.files}


def test_sampler_steps_schedule_info_and_nfe_line(uncond, tmp_path, capsys):
    assert sample(uncond, tmp_path / "k", "--sampler", "dpm++2m", "--steps", "6", "--schedule", "karras",
                  "--num_samples", "5", "--batch_size", "2") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "20 timesteps as loaded; dpm++2m, 6 steps on its karras grid of the full T" in lines[0]
    assert lines[-1].startswith("5 samples in ") and lines[-1].endswith("; dpm++2m on the karras grid, NFE 6")
    info = json.loads((tmp_path / "k" / "sample_info.json").read_text())
    assert (info["sampler"], info["schedule"], info["steps"], info["nfe"]) == ("dpm++2m", "karras", 6, 6)
    assert info["num_sampling_steps"] == 6 and info["timestep_respacing"] == "" and info["use_ddim"] is False
    got = images(tmp_path / "k", 5)["arr_0"]
    assert got.dtype == np.uint8 and got.shape == (5, 8, 8, 1) and got.std() > 0
    # the default grid is recorded; another schedule gives other images
    assert sample(uncond, tmp_path / "d", "--sampler", "dpm++2m", "--steps", "6", "--num_samples", "5") == 0
    assert json.loads((tmp_path / "d" / "sample_info.json").read_text())["schedule"] == "logsnr"
    assert not np.array_equal(images(tmp_path / "d", 5)["arr_0"], got)


def test_ancestral_reports_its_nfe_and_steps_means_the_respacing(uncond, tmp_path, capsys):
    assert sample(uncond, tmp_path / "a", "--steps", "5", "--num_samples", "3", "--seed", "1") == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("; ancestral, NFE 5")
    info = json.loads((tmp_path / "a" / "sample_info.json").read_text())
    assert (info["sampler"], info["schedule"], info["nfe"], info["timestep_respacing"]) == ("ancestral", None, 5, "5")
    assert sample(uncond, tmp_path / "b", "--timestep_respacing", "5", "--num_samples", "3", "--seed", "1") == 0
    np.testing.assert_array_equal(images(tmp_path / "a", 3)["arr_0"], images(tmp_path / "b", 3)["arr_0"])


def test_sde_solver_is_batch_size_invariant_and_writes_a_trajectory(uncond, tmp_path):
    common = ["--sampler", "dpm++2m-sde", "--steps", "7", "--num_samples", "5", "--seed", "4", "--grid_size", "0"]
    assert sample(uncond, tmp_path / "a", *common, "--batch_size", "5", "--trajectory", "gif") == 0
    assert sample(uncond, tmp_path / "b", *common, "--batch_size", "2", "--fast", "false") == 0
    assert_same_images(images(tmp_path / "a", 5)["arr_0"], images(tmp_path / "b", 5)["arr_0"])
    assert (tmp_path / "a" / "trajectory.gif").is_file()


def test_class_conditional_solver_and_respacing_count(tmp_path, capsys):
    cond = checkpoint(tmp_path / "cond.safetensors", class_cond=True, num_classes=10)
    assert sample(cond, tmp_path / "c", "--sampler", "unipc", "--timestep_respacing", "4", "--balanced",
                  "--num_samples", "12") == 0
    assert "4 unipc steps on its logsnr grid of the full diffusion" in capsys.readouterr().out
    np.testing.assert_array_equal(images(tmp_path / "c", 12)["arr_1"], np.arange(12) % 10)
    info = json.loads((tmp_path / "c" / "sample_info.json").read_text())
    assert info["nfe"] == 4 and info["timestep_respacing"] == ""
    assert info["config"]["diffusion"]["diffusion_steps"] == 20


def test_upsample_with_a_solver(tmp_path, capsys):
    sr = checkpoint(tmp_path / "sr.safetensors", small_size=4, in_channels=3, class_cond=True, num_classes=3)
    base = np.random.default_rng(0).integers(0, 256, size=(4, 4, 4, 3), dtype=np.uint8)
    base_npz = save_npz(tmp_path / "base", base, np.array([0, 1, 2, 0]))
    args = ["upsample", "--run", str(sr), "--base_samples", str(base_npz), "--quiet", "--sampler", "dpm++3m",
            "--steps", "5"]
    assert main([*args, "--out", str(tmp_path / "u"), "--batch_size", "4"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("; dpm++3m on the logsnr grid, NFE 5")
    up = images(tmp_path / "u", 4, "8x8x3")
    assert up["arr_0"].shape == (4, 8, 8, 3) and up["arr_1"].tolist() == [0, 1, 2, 0]
    assert json.loads((tmp_path / "u" / "sample_info.json").read_text())["sampler"] == "dpm++3m"
    assert main([*args, "--out", str(tmp_path / "v"), "--batch_size", "3"]) == 0
    assert_same_images(images(tmp_path / "v", 4, "8x8x3")["arr_0"], up["arr_0"])


@pytest.mark.parametrize("args,message", [
    (["--sampler", "euler"], "--sampler 'euler': unknown; choose one of ancestral, ddim, dpm++2m, dpm++3m"),
    (["--sampler", "dpm++2m", "--schedule", "cosine"], "--schedule 'cosine': unknown; choose one of uniform, logsnr"),
    (["--schedule", "karras"], "--schedule karras: only for the solvers"),
    (["--sampler", "dpm++2m", "--use_ddim"], "--use_ddim: not with --sampler dpm++2m"),
    (["--sampler", "dpm++2m", "--steps", "5", "--timestep_respacing", "10"],
     "--steps 5: not with --timestep_respacing 10 (both set the number of steps)"),
    (["--steps", "-2"], "--steps -2: must be >= 1"),
    (["--sampler", "unipc", "--eta", "0.3"], "--eta 0.3: only used with --use_ddim"),
])
def test_bad_flags_are_one_line_errors(uncond, tmp_path, capsys, args, message):
    assert sample(uncond, tmp_path, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[-1], err


@pytest.mark.slow
def test_torchrun_two_processes_give_the_single_process_images(uncond, tmp_path):
    """torchrun shares the batches out and rank 0 gathers them: the same images as one process (SDE noise too)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["-m", "iddpm", "sample", "--model_path", str(uncond), "--quiet", "--sampler", "dpm++2m-sde", "--steps",
            "4", "--num_samples", "5", "--batch_size", "2", "--grid_size", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(port), *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.strip().splitlines()[-1].endswith("; dpm++2m-sde on the logsnr grid, NFE 4")
    assert sample(uncond, tmp_path / "one", *args[5:]) == 0
    assert_same_images(images(tmp_path / "two", 5)["arr_0"], images(tmp_path / "one", 5)["arr_0"])
