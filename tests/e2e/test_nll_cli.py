"""``iddpm nll`` on a tiny checkpoint: digits test split by default, summary and per-timestep file."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import save_tiny_model, tiny_cfg

from iddpm import api
from iddpm.cli.main import main
from iddpm.diffusion import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from iddpm.eval.nll import nll_loader
from iddpm.models import optimize
from iddpm.sample.noise import PerSampleNoise


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "m.safetensors", tiny_cfg())


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
    # the same numbers through the Python API (same seed, different batch size), up to the float32 round-off of
    # the network: the bound is computed from the conditioning (see _network_roundoff_bound)
    res = api.nll(ckpt, num_examples=6, batch_size=6, timestep_respacing="5")
    tol = _network_roundoff_bound(ckpt, 6, "5", batch_sizes=(4, 6), bpd=summary["bpd"])
    assert tol < 1e-4 * summary["bpd"]  # still tight: 1.1e-5 relative (93 eps32) on an Intel Xeon
    assert abs(res.bpd - summary["bpd"]) <= tol, (res.bpd, summary["bpd"], tol)
    assert abs(np.mean(res.per_example_bpd[:5]) - summary["bpd"]) > tol  # a lost example would not pass


def _network_roundoff_bound(ckpt, n: int, respacing: str, *, batch_sizes, bpd: float) -> float:
    """Bound on |bpd_a - bpd_b| for two float32 NLL runs of the first ``n`` test digits that differ only in the
    network's reduction order (batch size, NCHW or the channels_last fast path, threads): the diffusion maths
    after the network is the same elementwise code on the same inputs, and all K + 1 summed terms are >= 0.

    First order: |bpd_a - bpd_b| <= sum_{t,p} |d bpd / d o_{t,p}| (|o_a - o64| + |o_b - o64|)_{t,p}
                                   + (K + 1) eps32 bpd   (each side's float32 sum of K + 1 positive terms)
    with o_{t,p} the network outputs at step t and the two sides' common float32 inputs x_t, o64 the float64
    network at those inputs, |o_c - o64| measured for every configuration c (batch sizes x {plain, fast}) and
    the gradient taken in float64 by autograd.  ~ 93 eps32 * bpd on an Intel Xeon (AVX-512), where the runs
    differ by 4 eps32; an AMD EPYC (AVX2) measured 8.8 eps32.
    """
    eps32 = 2.0**-23
    model, diffusion, cfg = api.load_run(ckpt, timestep_respacing=respacing)
    nets32 = [model, optimize(copy.deepcopy(model), mode="sample", compile=False)]
    net64 = copy.deepcopy(model).double()
    x32 = torch.as_tensor(next(iter(nll_loader(cfg, batch_size=n)))[0], dtype=torch.float32)
    x64 = x32.double()
    streams = PerSampleNoise(0, range(n), x32.shape[1:])  # compute_nll's draws: one per step, t = T-1 .. 0
    outputs, deviations = [], []

    def net(x, ts, **kwargs):  # the float64 network; records every float32 configuration's distance from it
        with torch.no_grad():
            o64 = net64(x, ts, **kwargs)
            o32 = [torch.cat([f(x[s:s + b].float(), ts[s:s + b]) for s in range(0, n, b)])
                   for f in nets32 for b in batch_sizes]
        deviations.append(torch.stack([(o.double() - o64).abs() for o in o32]).amax(0))
        outputs.append(o64.requires_grad_(True))
        return outputs[-1]

    total = 0.0  # the model-dependent part of the mean bpd (the prior term does not depend on the network)
    for t in reversed(range(diffusion.num_timesteps)):
        tb = torch.full((n,), t)
        x_t = diffusion.q_sample(x32, tb, noise=streams.draw()).double()  # both sides' float32 x_t
        out = diffusion.p_mean_variance(net, x_t, tb, clip_denoised=True)
        if t > 0:
            mean, _, log_var = diffusion.q_posterior_mean_variance(x_start=x64, x_t=x_t, t=tb)
            term = mean_flat(normal_kl(mean, log_var, out["mean"], out["log_variance"]))
        else:
            term = -mean_flat(discretized_gaussian_log_likelihood(x64, means=out["mean"],
                                                                  log_scales=0.5 * out["log_variance"]))
        total = total + term.mean() / math.log(2.0)
    grads = torch.autograd.grad(total, outputs)
    network = sum(float((g.abs() * 2 * d).sum()) for g, d in zip(grads, deviations))
    return network + (diffusion.num_timesteps + 1) * eps32 * bpd


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
