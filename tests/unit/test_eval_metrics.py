"""Known-answer tests of FID, KID, IS, precision/recall and statistics files."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from iddpm.config import ConfigError
from iddpm.eval.metrics import (
    feature_stats,
    frechet_distance,
    inception_score,
    is_stats_file,
    kernel_inception_distance,
    load_stats,
    precision_recall,
    save_stats,
)


def _random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_identical_statistics_is_zero():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((500, 12))
    s = feature_stats(f)
    assert abs(frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-8


def test_fid_diagonal_closed_form():
    rng = np.random.default_rng(1)
    d = 7
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expect = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-10)
    # the same in a rotated basis (commuting covariances, not diagonal)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    got = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expect, rel=1e-9)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_fid_general_matches_symmetric_form():
    # tr sqrt(S1 S2) == tr sqrt(S1^1/2 S2 S1^1/2) (a symmetric PSD matrix: eigenvalues are safe)
    rng = np.random.default_rng(2)
    d = 9
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    r1 = scipy.linalg.sqrtm(s1).real
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    expect = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)


def test_fid_of_empirical_gaussians_approaches_closed_form():
    rng = np.random.default_rng(3)
    a, b = np.array([1.0, 2.0, 0.5]), np.array([2.0, 0.5, 1.0])
    x = rng.standard_normal((200_000, 3)) * np.sqrt(a)
    y = rng.standard_normal((200_000, 3)) * np.sqrt(b) + 1.0
    sx, sy = feature_stats(x), feature_stats(y)
    expect = 3.0 + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma) == pytest.approx(expect, abs=0.03)


def test_fid_singular_covariances_stay_finite():
    rng = np.random.default_rng(4)
    f = rng.standard_normal((5, 20))  # rank-4 covariance in 20 dimensions
    s = feature_stats(f)
    val = frechet_distance(s.mu, s.sigma, s.mu, s.sigma)
    assert np.isfinite(val) and abs(val) < 1e-3
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(s.mu, s.sigma, s.mu[:3], s.sigma[:3, :3])


def _mmd2_unbiased_loops(x, y):
    d = x.shape[1]

    def k(a, b):
        return (a @ b / d + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_direct_formula_and_detects_shift():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((12, 4)), rng.standard_normal((12, 4)) + 0.5
    # one subset covering both sets: order does not matter, so it is the full-set estimate
    kid, std = kernel_inception_distance(x, y, num_subsets=1, subset_size=100)
    assert kid == pytest.approx(_mmd2_unbiased_loops(x, y), rel=1e-10) and std == 0.0
    same = kernel_inception_distance(rng.standard_normal((400, 8)), rng.standard_normal((400, 8)), 20, 200)
    shifted = kernel_inception_distance(rng.standard_normal((400, 8)), rng.standard_normal((400, 8)) + 1, 20, 200)
    assert abs(same[0]) < 3 * same[1] + 1e-3
    assert shifted[0] > 10 * max(shifted[1], abs(same[0]))
    f = rng.standard_normal((300, 8))
    assert kernel_inception_distance(f, f, 10, 300)[0] == pytest.approx(
        kernel_inception_distance(f, f, 10, 300)[0])  # deterministic by seed
    assert kernel_inception_distance(f, f, 10, 100, seed=0) != kernel_inception_distance(f, f, 10, 100, seed=1)


def test_inception_score_known_values():
    k = 10
    assert inception_score(np.full((100, k), 1.0 / k), splits=4, from_logits=False) == pytest.approx((1.0, 0.0))
    assert inception_score(np.zeros((100, k)), splits=4)[0] == pytest.approx(1.0)  # uniform logits
    onehot = np.eye(k)[np.arange(200) % k]
    mean, std = inception_score(onehot, splits=5, from_logits=False)
    assert mean == pytest.approx(k) and std == pytest.approx(0.0, abs=1e-9)
    # confident logits approach one-hot
    assert inception_score(100.0 * onehot, splits=5)[0] == pytest.approx(k, rel=1e-6)
    # all samples the same confident class -> 1
    assert inception_score(np.eye(k)[np.zeros(50, int)], splits=2, from_logits=False)[0] == pytest.approx(1.0)


def test_precision_recall_known_cases():
    rng = np.random.default_rng(6)
    a = rng.standard_normal((150, 5))
    assert precision_recall(a, a, k=3, batch_size=32) == (1.0, 1.0)
    far = rng.standard_normal((120, 5)) + 100.0
    assert precision_recall(a, far, k=3, batch_size=50) == (0.0, 0.0)
    # fakes cover only one of two well-separated real modes: precision 1, recall 1/2
    b = rng.standard_normal((150, 5)) + 100.0
    real = np.concatenate([a, b])
    fake = a + 1e-3 * rng.standard_normal(a.shape)
    p, r = precision_recall(real, fake, k=3, batch_size=64)
    assert p == 1.0 and r == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError):
        precision_recall(a[:3], a, k=3)


def test_stats_roundtrip(tmp_path):
    rng = np.random.default_rng(7)
    s = feature_stats(rng.standard_normal((30, 6)), extractor="x", logits=rng.standard_normal((30, 3)))
    save_stats(tmp_path / "s.npz", s)
    back = load_stats(tmp_path / "s.npz")
    np.testing.assert_allclose(back.mu, s.mu)
    np.testing.assert_allclose(back.sigma, s.sigma)
    assert back.num == 30 and back.extractor == "x" and back.features is None and back.logits is None
    save_stats(tmp_path / "f.npz", s, include_features=True)
    full = load_stats(tmp_path / "f.npz")
    np.testing.assert_allclose(full.features, s.features, rtol=1e-6)
    assert full.logits.shape == (30, 3)
    assert is_stats_file(tmp_path / "s.npz")
    np.savez(tmp_path / "img.npz", np.zeros((2, 4, 4, 3), np.uint8))
    assert not is_stats_file(tmp_path / "img.npz")
    with pytest.raises(ConfigError, match="mu and sigma"):
        load_stats(tmp_path / "img.npz")
