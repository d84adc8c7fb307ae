"""Parity: likelihood helpers against ``loss_functions.npz`` in float32 and float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from iddpm.diffusion import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, mean_flat, normal_kl

TOL = {"f32": dict(rtol=1e-5, atol=1e-6), "f64": dict(rtol=1e-12, atol=1e-14)}
DTYPE = {"f32": np.float32, "f64": np.float64}
EPS = {"f32": 2.0**-23, "f64": 2.0**-52}  # machine epsilon: one ulp of v is at most EPS * |v|


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


def _loglik_roundoff(x, means, log_scales, out, eps) -> np.ndarray:
    """Per-element bound on how far two implementations of ``discretized_gaussian_log_likelihood`` in a float
    format of machine epsilon ``eps`` can differ, evaluated in float64 on the given inputs.

    IEEE +, -, * are correctly rounded, hence identical on every CPU for identical operands; the transcendental
    functions differ (vectorised tanh / exp / pow / log of different instruction sets), each within
    1 ulp <= eps * |value| of the exact value, and what is computed from them is rounded anew.  First order, for
    p = e^-s (x - m +- 1/255), y = sqrt(2/pi) (p + 0.044715 p^3), t = tanh(y), cdf = (1 + t) / 2, each
    implementation's cdf is within
        e = eps (|t| + (1 + t) / 2) / 2 + (1 - t^2) / 2 * dy,   dy = 8 eps sqrt(2/pi) (|p| + 3 * 0.044715 |p|^3)
    of the exact one (tanh's ulp, the rounding of 1 + t, and y's ~8 roundings: exp and pow 1 ulp each, the
    cube tripling p's error, the products and sums).  So the probability P (cdf_plus, 1 - cdf_min, or
    cdf_plus - cdf_min; E = e or e_plus + e_min) of both lies in [P - E, P + E], and P within the same bound
    with eps64 of its float64 value here (e is linear in eps: use eps + eps64).  After the 1e-12 clamp, the
    two logs lie in [log max(P - E, 1e-12), log max(P + E, 1e-12)]: its width plus log's own ulp is the bound.
    It is ~eps where P is not small, and grows as eps / P where cdf_plus - cdf_min cancels near 1 or
    1 + tanh cancels near 0: the elements where CPUs disagree (-24.794498 vs -24.794505 on an AMD EPYC).
    """
    x, means, log_scales, out = (np.asarray(a, dtype=np.float64) for a in (x, means, log_scales, out))
    c, u = math.sqrt(2.0 / math.pi), eps + 2.0**-52

    def cdf_and_error(p):
        t = np.tanh(c * (p + 0.044715 * p**3))
        dy = 8 * u * c * (np.abs(p) + 3 * 0.044715 * np.abs(p) ** 3)
        return 0.5 * (1 + t), 0.5 * u * (np.abs(t) + 0.5 * (1 + t)) + 0.5 * (1 - t * t) * dy

    inv_stdv = np.exp(-log_scales)
    cdf_plus, e_plus = cdf_and_error(inv_stdv * (x - means + 1 / 255))
    cdf_min, e_min = cdf_and_error(inv_stdv * (x - means - 1 / 255))
    prob = np.where(x < -0.999, cdf_plus, np.where(x > 0.999, 1 - cdf_min, cdf_plus - cdf_min))
    err = np.where(x < -0.999, e_plus, np.where(x > 0.999, e_min, e_plus + e_min))
    return np.log(np.maximum(prob + err, 1e-12) / np.maximum(prob - err, 1e-12)) + eps * np.abs(out)


def _loglik_excess(got, z, tag) -> np.ndarray:
    """|got - reference| beyond the tolerance: TOL[tag] plus the element's round-off bound (0 where within)."""
    k = f"discretized_gaussian_log_likelihood.{tag}"
    ref = z[f"{k}.out"]
    bound = _loglik_roundoff(z[f"{k}.x"], z[f"{k}.means"], z[f"{k}.log_scales"], ref, EPS[tag])
    tol = TOL[tag]["atol"] + TOL[tag]["rtol"] * np.abs(ref) + bound
    return np.maximum(np.abs(np.asarray(got, dtype=np.float64) - ref) - tol, 0)


@pytest.mark.parametrize("tag", ["f32", "f64"])
def test_discretized_gaussian_log_likelihood(z, tag):
    k = f"discretized_gaussian_log_likelihood.{tag}"
    x, means, log_scales = (torch.from_numpy(z[f"{k}.{n}"]) for n in ("x", "means", "log_scales"))
    assert (x == -1).any() and (x == 1).any()  # both open edge bins are exercised
    out = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    assert out.numpy().dtype == DTYPE[tag] == z[f"{k}.out"].dtype
    # element-wise against TOL[tag] plus the element's round-off bound (f64: 6e-15 on the median element, 1e-4 at
    # the AMD mismatch, which was off by 7e-6; f32: these inputs saturate float32's cdf on half the elements)
    excess = _loglik_excess(out.numpy(), z, tag)
    assert not excess.any(), f"{np.count_nonzero(excess)} of {excess.size} elements off, by up to {excess.max()}"
    # Far-off means: the 1e-12 clamp fires, so the log-likelihood is exactly log(1e-12) there.
    assert torch.isclose(out[:, 4:8], torch.tensor(np.log(1e-12), dtype=out.dtype), rtol=1e-6).any()


def _numpy_loglik(z, tag, *, half_bin=1 / 255, mean_sign=1.0):
    """The same formula through NumPy's own tanh / exp / log (another libm), optionally with a bug."""
    k = f"discretized_gaussian_log_likelihood.{tag}"
    dt = DTYPE[tag]
    x, means, log_scales = (z[f"{k}.{n}"] for n in ("x", "means", "log_scales"))

    def cdf(v):
        return dt(0.5) * (dt(1) + np.tanh(dt(math.sqrt(2 / math.pi)) * (v + dt(0.044715) * v**3)))

    centered, inv_stdv = x - dt(mean_sign) * means, np.exp(-log_scales)
    cdf_plus, cdf_min = cdf(inv_stdv * (centered + dt(half_bin))), cdf(inv_stdv * (centered - dt(half_bin)))
    floor = dt(1e-12)
    return np.where(x < -0.999, np.log(np.maximum(cdf_plus, floor)),
                    np.where(x > 0.999, np.log(np.maximum(1 - cdf_min, floor)),
                             np.log(np.maximum(cdf_plus - cdf_min, floor))))


@pytest.mark.parametrize("tag", ["f32", "f64"])
def test_discretized_gaussian_log_likelihood_tolerance_accepts_another_libm_and_rejects_bugs(z, tag):
    ref = z[f"discretized_gaussian_log_likelihood.{tag}.out"]
    # NumPy's libm disagrees with the reference where the maths is ill-conditioned (on an Intel Xeon: 34 f64
    # elements, by up to 1.2e-5, at most 0.07 of their tolerance; f32: 66 elements, by up to 10.3 where the
    # reference's cdf difference rounds to 0, clamped to log(1e-12), and NumPy's to one quantum, log(3e-8):
    # 0.88 of the tolerance) ...
    assert not _loglik_excess(_numpy_loglik(z, tag), z, tag).any()  # ... and the tolerance accepts it
    for bug in (dict(half_bin=1 / 256), dict(mean_sign=-1.0)):  # a wrong bin width, a sign flip
        assert np.count_nonzero(_loglik_excess(_numpy_loglik(z, tag, **bug), z, tag)) > ref.size // 4, bug


def test_discretized_gaussian_log_likelihood_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        discretized_gaussian_log_likelihood(torch.zeros(2, 3), means=torch.zeros(2, 3), log_scales=torch.zeros(3))


def test_mean_flat(z):
    got = mean_flat(torch.from_numpy(z["mean_flat.in"]))
    np.testing.assert_allclose(got.numpy(), z["mean_flat.out"], rtol=1e-6, atol=1e-7)
    assert got.shape == (3,)
