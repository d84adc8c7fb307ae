"""compute_nll: calc_bpd_loop semantics, ascending-t re-indexing, batch invariance, output files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from iddpm.diffusion import create_gaussian_diffusion
from iddpm.eval.nll import compute_nll, save_nll
from iddpm.sample import PerSampleNoise

SHAPE = (3, 4, 4)


def toy_model(x, t, y=None):
    s = t.float().reshape(-1, 1, 1, 1)
    eps = torch.tanh(0.7 * x + 0.3 * torch.sin(s / 100))
    var = torch.tanh(0.5 * x - 0.2 * torch.cos(s / 100))
    if y is not None:
        eps = eps + 0.05 * y.float().reshape(-1, 1, 1, 1)
    return torch.cat([eps, var], dim=1)


@pytest.fixture(scope="module")
def diffusion():
    return create_gaussian_diffusion(steps=10, learn_sigma=True, noise_schedule="cosine", rescale_timesteps=True,
                                     timestep_respacing="5")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (7, *SHAPE), generator=g).float() / 127.5 - 1)
    y = torch.arange(7) % 3
    return x, y


def batches(data, bs, with_y=True):
    x, y = data
    return [(x[i:i + bs], {"y": y[i:i + bs]} if with_y else {}) for i in range(0, len(x), bs)]


def test_matches_calc_bpd_loop_reindexed_to_ascending_t(diffusion, data):
    x, _ = data
    res = compute_nll(toy_model, diffusion, batches(data, 7, with_y=False), progress=False, seed=4)
    streams = PerSampleNoise(4, range(7), SHAPE)
    ref = diffusion.calc_bpd_loop(toy_model, x, clip_denoised=True,
                                  step_noise=[streams.draw() for _ in range(diffusion.num_timesteps)])
    T = diffusion.num_timesteps
    assert res.vb_per_t.shape == (T,) and res.num_examples == 7
    # column k of the loop output is t = T-1-k; ours is indexed by t
    np.testing.assert_allclose(res.vb_per_t, ref["vb"].double().mean(0).numpy()[::-1], rtol=1e-6)
    np.testing.assert_allclose(res.xstart_mse_per_t, ref["xstart_mse"].double().mean(0).numpy()[::-1], rtol=1e-6)
    np.testing.assert_allclose(res.mse_per_t, ref["mse"].double().mean(0).numpy()[::-1], rtol=1e-6)
    np.testing.assert_allclose(res.per_example_bpd, ref["total_bpd"].double().numpy(), rtol=1e-6)
    assert res.bpd == pytest.approx(float(ref["total_bpd"].double().mean()), rel=1e-6)
    assert res.prior_bpd == pytest.approx(float(ref["prior_bpd"].double().mean()), rel=1e-6)
    # decoder term is t = 0, i.e. the last loop column
    assert res.decoder_bpd == pytest.approx(float(ref["vb"][:, -1].double().mean()), rel=1e-6)
    assert res.bpd == pytest.approx(res.vb_sum + res.prior_bpd, rel=1e-6)
    np.testing.assert_array_equal(res.timestep_map, [0, 2, 4, 7, 9])


def test_batch_size_does_not_change_the_result(diffusion, data):
    a = compute_nll(toy_model, diffusion, batches(data, 7), progress=False)
    b = compute_nll(toy_model, diffusion, batches(data, 2), progress=False)
    np.testing.assert_allclose(a.per_example_bpd, b.per_example_bpd, rtol=1e-6)
    np.testing.assert_allclose(a.vb_per_t, b.vb_per_t, rtol=1e-6)


def test_labels_used_only_when_asked(diffusion, data):
    with_y = compute_nll(toy_model, diffusion, batches(data, 4), progress=False)
    without = compute_nll(toy_model, diffusion, batches(data, 4), progress=False, use_labels=False)
    plain = compute_nll(toy_model, diffusion, batches(data, 4, with_y=False), progress=False)
    assert with_y.bpd != pytest.approx(without.bpd, rel=1e-9)
    assert without.bpd == pytest.approx(plain.bpd, rel=1e-12)


def test_limits(diffusion, data):
    r = compute_nll(toy_model, diffusion, batches(data, 3), progress=False, max_examples=4)
    full = compute_nll(toy_model, diffusion, batches(data, 3), progress=False)
    assert r.num_examples == 4
    np.testing.assert_allclose(r.per_example_bpd, full.per_example_bpd[:4], rtol=1e-6)
    assert compute_nll(toy_model, diffusion, batches(data, 3), progress=False, max_batches=1).num_examples == 3


def test_save_formats(tmp_path, diffusion, data):
    res = compute_nll(toy_model, diffusion, batches(data, 4), progress=False)
    p = save_nll(res, tmp_path / "n.csv")
    rows = list(csv.DictReader(p.open()))
    assert [int(r["t"]) for r in rows] == list(range(5))
    assert [int(r["original_t"]) for r in rows] == [0, 2, 4, 7, 9]
    np.testing.assert_allclose([float(r["vb_bpd"]) for r in rows], res.vb_per_t)
    summary = json.loads((tmp_path / "n.json").read_text())
    assert summary["num_examples"] == 7 and summary["bpd"] == pytest.approx(res.bpd)
    with np.load(save_nll(res, tmp_path / "n.npz")) as z:
        np.testing.assert_allclose(z["vb"], res.vb_per_t)
        assert float(z["prior_bpd"]) == pytest.approx(res.prior_bpd)
    d = json.loads(save_nll(res, tmp_path / "all.json").read_text())
    assert len(d["vb_bpd"]) == 5 and d["decoder_bpd"] == pytest.approx(res.vb_per_t[0])
