"""Parity: likelihood helpers against ``loss_functions.npz`` in float32 and float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iddpm.diffusion import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, mean_flat, normal_kl

TOL = {"f32": dict(rtol=1e-5, atol=1e-6), "f64": dict(rtol=1e-12, atol=1e-14)}
DTYPE = {"f32": np.float32, "f64": np.float64}


@pytest.fixture(scope="module")
def z(reference_dir):
    with np.load(reference_dir / "loss_functions.npz") as f:
        return {k: f[k] for k in f.files}


def _check(got: torch.Tensor, expected: np.ndarray, tag: str):
    assert got.numpy().dtype == DTYPE[tag] == expected.dtype
    np.testing.assert_allclose(got.numpy(), expected, **TOL[tag])


@pytest.mark.parametrize("tag", ["f32", "f64"])
def test_normal_kl(z, tag):
    a = {k: torch.from_numpy(z[f"normal_kl.{tag}.{k}"]) for k in ("mean1", "logvar1", "mean2", "logvar2")}
    _check(normal_kl(a["mean1"], a["logvar1"], a["mean2"], a["logvar2"]), z[f"normal_kl.{tag}.out"], tag)
    # Python-scalar arguments broadcast and take the tensor's dtype.
    _check(normal_kl(a["mean1"], a["logvar1"], 0.0, 0.0), z[f"normal_kl_vs_std_normal.{tag}.out"], tag)


@pytest.mark.parametrize("tag", ["f32", "f64"])
def test_approx_standard_normal_cdf(z, tag):
    x = torch.from_numpy(z[f"approx_standard_normal_cdf.{tag}.x"])
    _check(approx_standard_normal_cdf(x), z[f"approx_standard_normal_cdf.{tag}.out"], tag)


@pytest.mark.parametrize("tag", ["f32", "f64"])
def test_discretized_gaussian_log_likelihood(z, tag):
    k = f"discretized_gaussian_log_likelihood.{tag}"
    x, means, log_scales = (torch.from_numpy(z[f"{k}.{n}"]) for n in ("x", "means", "log_scales"))
    assert (x == -1).any() and (x == 1).any()  # both open edge bins are exercised
    out = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    _check(out, z[f"{k}.out"], tag)
    # Far-off means: the 1e-12 clamp fires, so the log-likelihood is exactly log(1e-12) there.
    assert torch.isclose(out[:, 4:8], torch.tensor(np.log(1e-12), dtype=out.dtype), rtol=1e-6).any()


def test_discretized_gaussian_log_likelihood_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        discretized_gaussian_log_likelihood(torch.zeros(2, 3), means=torch.zeros(2, 3), log_scales=torch.zeros(3))


def test_mean_flat(z):
    got = mean_flat(torch.from_numpy(z["mean_flat.in"]))
    np.testing.assert_allclose(got.numpy(), z["mean_flat.out"], rtol=1e-6, atol=1e-7)
    assert got.shape == (3,)
