"""``iddpm nll`` on a tiny checkpoint: digits test split by default, summary and per-timestep file."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import random_weights

from iddpm import api
from iddpm.checkpoints.model_file import save_model_file
from iddpm.cli.main import main
from iddpm.config import RunConfig, apply_overrides

TINY = dict(image_size=8, in_channels=1, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="4", learn_sigma=True, diffusion_steps=20, noise_schedule="cosine")



@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = apply_overrides(RunConfig(), TINY).validate()
    return save_model_file(tmp_path_factory.mktemp("m") / "m.safetensors", random_weights(cfg), cfg)


def test_nll_summary_and_csv(ckpt, tmp_path, capsys):
    out = tmp_path / "nll.csv"
    assert main(["nll", "--run", str(ckpt), "--num_examples", "6", "--batch_size", "4", "--timestep_respacing", "5",
                 "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "bundled digits, test split" in text and "bits/dim:" in text and "prior term" in text
    assert "decoder term (t=0)" in text and "sum of vb terms" in text
    rows = list(csv.DictReader(out.open()))
    assert [int(r["t"]) for r in rows] == list(range(5))
    assert [int(r["original_t"]) for r in rows] == [0, 5, 10, 14, 19]  # space_timesteps(20, "5")
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["num_examples"] == 6 and summary["num_timesteps"] == 5
    vb = np.array([float(r["vb_bpd"]) for r in rows])
    assert summary["bpd"] == pytest.approx(vb.sum() + summary["prior_bpd"], rel=1e-6)
    assert summary["decoder_bpd"] == pytest.approx(vb[0])
    # the same numbers through the Python API (same seed, different batch size)
    res = api.nll(ckpt, num_examples=6, batch_size=6, timestep_respacing="5")
    assert res.bpd == pytest.approx(summary["bpd"], rel=1e-6)


def test_nll_npz_output_and_data_dir(ckpt, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 1), dtype=np.uint8)
    data = tmp_path / "data.npz"
    np.savez(data, arr_0=images)
    out = tmp_path / "n.npz"
    assert main(["nll", "--run", str(ckpt), "--data_dir", str(data), "--timestep_respacing", "3", "--out", str(out),
                 "--quiet"]) == 0
    with np.load(out) as z:
        assert z["vb"].shape == (3,) and int(z["num_examples"]) == 3
        assert z["per_example_bpd"].shape == (3,)


def test_nll_bad_out(ckpt, tmp_path, capsys):
    assert main(["nll", "--run", str(ckpt), "--out", str(tmp_path / "x.txt")]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_give_the_single_process_nll(ckpt, tmp_path):
    """2 CPU processes (gloo) take alternate batches; rank 0 reports the single-process numbers."""
    common = ["--model_path", str(ckpt), "--num_examples", "7", "--batch_size", "2", "--timestep_respacing", "4",
              "--quiet", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count on both sides: the same float32 round-off
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "iddpm",
           "nll", *common, "--out", str(tmp_path / "two.npz")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("bits/dim:") == 1 and "2 processes" in out.stdout  # rank 0 reports alone
    cmd = [sys.executable, "-m", "iddpm", "nll", *common, "--out", str(tmp_path / "one.npz")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    with np.load(tmp_path / "two.npz") as a, np.load(tmp_path / "one.npz") as b:
        assert int(a["num_examples"]) == int(b["num_examples"]) == 7
        # the same batches on both sides: per-example values bit-identical, means up to summation order
        np.testing.assert_array_equal(a["per_example_bpd"], b["per_example_bpd"])
        for k in ("vb", "xstart_mse", "mse", "bpd", "prior_bpd"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-15)
