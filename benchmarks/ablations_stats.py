"""The ablation benchmark's own statistics (pure numpy / torch; no training, sampling or I/O).

Spreads of training curves, the gradient noise scale of McCandlish et al. (2018), paired differences with
standard errors, the 2-standard-error verdict, and bootstrap standard errors of FID (one set, or the paired
difference of two sets whose sample i came from the same starting noise).  FID itself is
:func:`iddpm.eval.metrics.frechet_distance`, the function ``iddpm.api.evaluate`` reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from iddpm.eval.metrics import FeatureStats, feature_stats, frechet_distance

_FID_SEED_TAG = 0xF1D  # bootstrap stream of one FID's standard error
_PAIRED_SEED_TAG = 0xD1FF  # bootstrap stream of a paired FID difference


def spread(values) -> dict:
    """Mean, std and coefficient of variation (std / |mean|) of a 1-d sequence (NaN when empty)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size < 2:
        return {"mean": float("nan"), "std": float("nan"), "cv": float("nan"), "n": int(v.size)}
    mean, std = float(v.mean()), float(v.std(ddof=1))
    return {"mean": mean, "std": std, "cv": std / abs(mean) if mean else float("nan"), "n": int(v.size)}


def noise_scale_from_grads(grads: torch.Tensor, batch_size: int) -> dict:
    """Gradient noise scale from ``K`` mini-batch gradients ``grads`` float64 [K, P] of batch ``batch_size``.

    tr(Sigma_batch) = sum_i |G_i - G_mean|^2 / (K - 1); per-example tr(Sigma) = B tr(Sigma_batch);
    |G|^2 unbiased = |G_mean|^2 - tr(Sigma_batch) / K.  ``b_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018);
    NaN when the |G|^2 estimate is not positive (gradient signal below the noise floor of K batches).
    """
    k = grads.shape[0]
    mean = grads.mean(0)
    tr_batch = float(((grads - mean) ** 2).sum(1).sum() / (k - 1))
    g2 = float(mean.pow(2).sum()) - tr_batch / k
    b_simple = batch_size * tr_batch / g2 if g2 > 0 else float("nan")
    g2_biased = float(mean.pow(2).sum())
    return {"b_simple": b_simple, "b_simple_lower": batch_size * tr_batch / g2_biased if g2_biased > 0 else 0.0,
            "tr_sigma": batch_size * tr_batch, "g2": g2, "mean_batch_grad_norm": float(grads.norm(dim=1).mean())}


def median_noise_scale(probes, from_step: int = 0) -> tuple[float, str]:
    """Median B_simple over probes at ``step >= from_step``; a probe whose |G|^2 estimate is not positive (noise
    beyond what its batches resolve) counts as +inf.  Returns ``(value, text)``; text is ``"> L"`` (L = median of
    the lower bounds ``B tr(Sigma_batch) / |G_mean|^2``) when the median is infinite, ``"n/a"`` with no probes."""
    ps = [p for p in probes if p["step"] >= from_step]
    if not ps:
        return float("nan"), "n/a"
    vals = [p["b_simple"] if math.isfinite(p["b_simple"]) else math.inf for p in ps]
    med = float(np.median(vals))
    if math.isfinite(med):
        return med, f"{med:.0f}"
    return med, f"> {float(np.median([p['b_simple_lower'] for p in ps])):.0f}"


def paired_diff(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean and standard error of a - b over the same examples (same noise streams)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
    return {"diff": float(d.mean()), "stderr": se}


def verdict(diff: float, stderr: float, expect_negative: bool) -> str:
    """'agrees' / 'disagrees' when the paired difference is beyond 2 standard errors, else 'within noise'."""
    if not (math.isfinite(diff) and math.isfinite(stderr)):
        return "n/a"
    if abs(diff) <= 2 * stderr:
        return "within noise"
    return "agrees" if (diff < 0) == expect_negative else "disagrees"


def fid_of_features(features: np.ndarray, ref_stats: FeatureStats) -> float:
    """FID of float64 [N, D] ``features`` against ``ref_stats``; NaN when the covariance is too ill-conditioned
    (very few samples) for :func:`frechet_distance`."""
    st = feature_stats(features)
    try:
        return frechet_distance(st.mu, st.sigma, ref_stats.mu, ref_stats.sigma)
    except ValueError:
        return float("nan")


def _bootstrap_stderr(n: int, num_boot: int, rng: np.random.Generator, stat: Callable[[np.ndarray], float]) -> float:
    """Standard error (ddof 1) of ``stat(idx)`` over ``num_boot`` resamples ``idx`` of ``range(n)`` with
    replacement; non-finite resamples are dropped (NaN with fewer than 2 left)."""
    boots = [stat(rng.integers(0, n, size=n)) for _ in range(num_boot)]
    boots = [b for b in boots if math.isfinite(b)]
    return float(np.std(boots, ddof=1)) if len(boots) > 1 else float("nan")


def fid_bootstrap_se(features: np.ndarray, ref_stats: FeatureStats, num_boot: int, seed: int) -> float:
    """Bootstrap standard error of FID(``features``) vs ``ref_stats``: the samples are resampled with replacement
    ``num_boot`` times from a generator seeded by ``seed``; the reference is held fixed."""
    rng = np.random.default_rng([int(seed), _FID_SEED_TAG])
    return _bootstrap_stderr(len(features), num_boot, rng, lambda idx: fid_of_features(features[idx], ref_stats))


def paired_fid_diff(feat_a: np.ndarray, feat_b: np.ndarray, ref_stats: FeatureStats, num_boot: int,
                    seed: int) -> dict:
    """FID(a) - FID(b) and its paired-bootstrap standard error: sample i of both sets comes from the same seeded
    starting noise, so both are resampled with the same indices (``num_boot`` times, seeded)."""
    d = fid_of_features(feat_a, ref_stats) - fid_of_features(feat_b, ref_stats)
    rng = np.random.default_rng([int(seed), _PAIRED_SEED_TAG])
    n = min(len(feat_a), len(feat_b))

    def stat(idx):
        return fid_of_features(feat_a[idx], ref_stats) - fid_of_features(feat_b[idx], ref_stats)

    return {"diff": float(d), "stderr": _bootstrap_stderr(n, num_boot, rng, stat)}
