"""Sample-quality metrics on feature vectors (numpy / scipy; no networks here).

- :func:`frechet_distance` -- FID (Heusel et al. 2017) from Gaussian statistics ``(mu, sigma)``:
  ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})``.
- :func:`kernel_inception_distance` -- KID (Binkowski et al. 2018): unbiased MMD^2 with the
  cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets.
- :func:`inception_score` -- IS (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` over
  contiguous splits.
- :func:`precision_recall` -- improved precision/recall (Kynkaenniemi et al. 2019) with k-NN
  hyperspheres (k = 3).
- :class:`FeatureStats` / :func:`save_stats` / :func:`load_stats` -- statistics files (.npz).

All features are float64 ``[N, D]``.  Random subsets use an explicit seed.  Precision/recall
distances run blockwise in torch (optionally on an accelerator).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from iddpm.config import ConfigError
from iddpm.runtime.atomic import atomic_write_bytes

__all__ = [
    "FeatureStats",
    "feature_stats",
    "frechet_distance",
    "kernel_inception_distance",
    "inception_score",
    "precision_recall",
    "save_stats",
    "load_stats",
    "is_stats_file",
]


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian statistics of a feature set, with the raw features/logits when kept.

    mu: float64 [D]; sigma: float64 [D, D] (unbiased covariance, ``np.cov(rowvar=False)``);
    features: float64 [N, D] or None; logits: float64 [N, K] or None; extractor: its name.
    """

    mu: np.ndarray
    sigma: np.ndarray
    num: int
    extractor: str = ""
    features: np.ndarray | None = None
    logits: np.ndarray | None = None


def feature_stats(features: np.ndarray, extractor: str = "", logits: np.ndarray | None = None) -> FeatureStats:
    """:class:`FeatureStats` of ``features`` [N, D] (N >= 2), keeping features and logits."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be [N >= 2, D], got {f.shape}")
    return FeatureStats(
        mu=f.mean(0), sigma=np.cov(f, rowvar=False), num=len(f), extractor=extractor, features=f,
        logits=None if logits is None else np.asarray(logits, dtype=np.float64),
    )


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``sqrtm(sigma1 @ sigma2)`` is computed with scipy; when it is not finite (singular product)
    ``eps * I`` is added to both covariances and it is recomputed.  A tiny imaginary part from
    round-off is dropped; a large one (|imag| > 1e-3 on the diagonal) raises ValueError.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if max_imag > 1e-3:
            raise ValueError(f"FID: sqrtm(sigma1 @ sigma2) has a large imaginary component ({max_imag:.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def _poly_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    m, n = len(x), len(y)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kernel_inception_distance(
    features1: np.ndarray, features2: np.ndarray, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: mean and std of the unbiased polynomial-kernel MMD^2 over random subsets.

    Each subset draws ``min(subset_size, N1, N2)`` rows without replacement from each set
    (``np.random.default_rng(seed)``); sets of <2 rows raise ValueError.
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError(f"KID needs at least 2 feature vectors per set, got {len(f1)} and {len(f2)}")
    rng = np.random.default_rng(seed)
    vals = np.array([
        _poly_mmd2_unbiased(f1[rng.choice(len(f1), m, replace=False)], f2[rng.choice(len(f2), m, replace=False)])
        for _ in range(max(1, num_subsets))
    ])
    return float(vals.mean()), float(vals.std())


def inception_score(logits_or_probs: np.ndarray, splits: int = 10, from_logits: bool = True) -> tuple[float, float]:
    """IS mean and std over ``splits`` contiguous chunks (as the original TF code).

    Args:
        logits_or_probs: float [N, K]: class logits (softmax applied here) or probabilities.
        splits: number of chunks (capped at N).
    """
    x = np.asarray(logits_or_probs, np.float64)
    if from_logits:
        x = x - x.max(1, keepdims=True)
        p = np.exp(x)
        p /= p.sum(1, keepdims=True)
    else:
        p = x / x.sum(1, keepdims=True)
    scores = []
    for part in np.array_split(p, max(1, min(splits, len(p)))):
        py = part.mean(0, keepdims=True)
        kl = np.where(part > 0, part * (np.log(np.where(part > 0, part, 1.0)) - np.log(np.where(py > 0, py, 1.0))), 0.0)
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[len(a), len(b)]`` (clamped at 0 against round-off)."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return d.clamp_min_(0.0)


def _knn_radii_sq(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Squared distance from each row to its k-th nearest other row (row blocks of ``batch``)."""
    rows = max(1, min(batch, (1 << 24) // max(1, len(x))))  # keep a block under ~128 MB in float64
    out = []
    for i in range(0, len(x), rows):
        # the k+1 smallest include the point itself (distance 0)
        out.append(_sq_dists(x[i : i + rows], x).topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out)


def _coverage(queries: torch.Tensor, centers: torch.Tensor, radii_sq: torch.Tensor, batch: int) -> float:
    """Fraction of queries inside at least one ball (center ``centers[j]``, squared radius ``radii_sq[j]``)."""
    hits = 0
    for i in range(0, len(queries), batch):
        q = queries[i : i + batch]
        hit = torch.zeros(len(q), dtype=torch.bool, device=q.device)
        for j in range(0, len(centers), batch):
            hit |= (_sq_dists(q, centers[j : j + batch]) <= radii_sq[None, j : j + batch]).any(1)
        hits += int(hit.sum())
    return hits / len(queries)


def precision_recall(
    real_features: np.ndarray, fake_features: np.ndarray, k: int = 3, batch_size: int = 1024, device: str = "cpu"
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019).

    precision: fraction of fake points inside the real k-NN manifold (union of balls around each
    real point with radius = distance to its k-th nearest real neighbour); recall: the converse.
    Distances are computed in blocks of ``batch_size`` rows with torch on ``device`` (float64 on
    CPU, float32 on an accelerator).
    """
    dev = torch.device(device)
    dtype = torch.float64 if dev.type == "cpu" else torch.float32
    real = torch.as_tensor(np.asarray(real_features), dtype=dtype, device=dev)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=dtype, device=dev)
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} feature vectors per set")
    real_r = _knn_radii_sq(real, k, batch_size)
    fake_r = _knn_radii_sq(fake, k, batch_size)
    return _coverage(fake, real, real_r, batch_size), _coverage(real, fake, fake_r, batch_size)


# ---------------------------------------------------------------------------------------------
# statistics files
# ---------------------------------------------------------------------------------------------
def is_stats_file(path: str | os.PathLike) -> bool:
    """True for an .npz holding ``mu`` and ``sigma`` but no ``arr_0`` images."""
    p = Path(path)
    if p.suffix.lower() != ".npz" or not p.is_file():
        return False
    try:
        with np.load(p, allow_pickle=False) as f:
            return "mu" in f.files and "sigma" in f.files and "arr_0" not in f.files
    except Exception:
        return False


def save_stats(path: str | os.PathLike, stats: FeatureStats, include_features: bool = False) -> None:
    """Write ``mu``, ``sigma``, ``num``, ``extractor`` (and ``features``/``logits`` when asked) atomically."""
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "num": np.int64(stats.num), "extractor": np.str_(stats.extractor)}
    if include_features:
        if stats.features is not None:
            arrays["features"] = stats.features.astype(np.float32)
        if stats.logits is not None:
            arrays["logits"] = stats.logits.astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_stats(path: str | os.PathLike, flag: str = "REFERENCE") -> FeatureStats:
    """Read a statistics file written by :func:`save_stats` (or any .npz with ``mu`` and ``sigma``)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f.files or "sigma" not in f.files:
                raise KeyError("mu/sigma")
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            num = int(f["num"]) if "num" in f.files else 0
            extractor = str(f["extractor"]) if "extractor" in f.files else ""
            features = f["features"].astype(np.float64) if "features" in f.files else None
            logits = f["logits"].astype(np.float64) if "logits" in f.files else None
    except Exception as exc:
        raise ConfigError(
            f"{flag} {path}: not a feature-statistics .npz with mu and sigma ({type(exc).__name__}); "
            "write one with `iddpm eval ... --save_stats PATH`"
        ) from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ConfigError(f"{flag} {path}: mu {mu.shape} and sigma {sigma.shape} do not match ([D] and [D, D])")
    return FeatureStats(mu=mu, sigma=sigma, num=num, extractor=extractor, features=features, logits=logits)
