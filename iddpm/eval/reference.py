"""Reference statistics for sample quality measured during training, computed once and cached in the run directory.

``RUN_DIR/ref_stats.npz`` holds the reference images' feature statistics -- ``mu`` float64 [D], ``sigma`` float64
[D, D] (unbiased covariance), ``num`` -- the raw features of a fixed random subset of at most
:data:`MAX_REF_FEATURES` of them (float32, for KID and precision/recall) and ``meta``, a JSON record of what they
were computed from: the source, its fingerprint (file sizes and modification times; the bundled digits by name),
the image shape and the feature network.  The file is reused while that record is unchanged (e.g. on ``--resume``)
and recomputed when the source or the extractor changes.  It is also a statistics file of ``iddpm eval``
(``iddpm eval samples.npz RUN_DIR/ref_stats.npz``).

Sources (``--eval_ref``): ``""`` = the run's training data (the images as the model sees them: preprocessed to
its size and channels, never flipped; the bundled digits' train split), an image folder or ``.npz`` of images of
the run's size, saved statistics (``iddpm eval --save_stats``; KID and precision/recall need them saved with
``--save_features``), or ``digits-train`` / ``digits-test`` / ``digits-all``.  At most :data:`MAX_REF_IMAGES`
images are used (a fixed random subset of larger sets).

:meth:`Reference.compare` gives FID (the exact statistic of ``iddpm eval``) with a bootstrap standard error, KID
and precision/recall of a set of sample features against the reference.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iddpm.config import ConfigError, DataConfig
from iddpm.data import load_dataset
from iddpm.eval.evaluate import DIGITS_SOURCES, _auto_extractor, load_source
from iddpm.eval.metrics import (
    FeatureStats,
    feature_stats,
    frechet_distance,
    is_stats_file,
    kernel_inception_distance,
    load_stats,
    precision_recall,
)
from iddpm.runtime.atomic import atomic_write_bytes

__all__ = ["REF_FILE", "FORMAT", "MAX_REF_IMAGES", "MAX_REF_FEATURES", "BOOTSTRAP_RESAMPLES", "KID_SUBSETS", "PR_K",
           "Reference", "describe_source", "extractor_for", "load_or_compute_reference", "bootstrap_fid_se"]

REF_FILE = "ref_stats.npz"
FORMAT = "iddpm-ref-stats/1"
MAX_REF_IMAGES = 50_000  # FID's customary reference size; larger sets use a fixed random subset
MAX_REF_FEATURES = 10_000  # raw features kept for KID and precision/recall (float32: 80 MB at D = 2048)
BOOTSTRAP_RESAMPLES = 20  # resamples of the sample features behind the FID standard error
KID_SUBSETS = 20  # KID subsets of min(1000, K, N) rows (iddpm eval's default is 100; 20 keeps evaluation cheap)
PR_K = 3  # k of the k-NN manifolds (Kynkaanniemi et al. 2019)
_CHUNK = 256  # images per feature-extraction call while computing the reference
_SEED = 0x5EF  # seed of the reference subsets (fixed: the cache does not depend on the run's --seed)

Log = Callable[[str], None] | None


@dataclass
class Reference:
    """Feature statistics of the reference set.  ``stats.features``: float64 [M, D] rows of a fixed random subset
    (M <= :data:`MAX_REF_FEATURES`) or None; ``meta``: what they were computed from (see the module docstring)."""

    stats: FeatureStats
    meta: dict[str, Any]
    path: Path | None = None
    reused: bool = False

    def compare(self, features: np.ndarray, *, seed: int = 0, device: str | torch.device = "cpu") -> dict[str, float]:
        """FID, ``fid_se``, KID (``kid``, ``kid_std``), precision and recall of sample ``features`` [K, D] (K >= 2).

        FID is :func:`~iddpm.eval.metrics.frechet_distance` of the samples' statistics against the reference's (the
        number ``iddpm eval`` gives for the same images); ``fid_se`` the standard deviation of FID over
        :data:`BOOTSTRAP_RESAMPLES` resamples (with replacement) of the K sample rows: the spread due to the finite
        sample, not to the reference.  KID (:data:`KID_SUBSETS` subsets) and precision/recall (k = :data:`PR_K`,
        against the first K reference rows, so both sets have the same size) need reference features; they are
        NaN without them, or with K <= k for precision/recall.  A FID that cannot be computed is NaN.
        """
        f = np.asarray(features, dtype=np.float64)
        s, ref = feature_stats(f), self.stats
        if s.mu.shape != ref.mu.shape:
            raise ConfigError(f"--eval_ref: the reference has {ref.mu.shape[0]}-d features, the samples "
                              f"{s.mu.shape[0]}-d; recompute it with the run's extractor")
        nan = float("nan")
        out = {"fid": nan, "fid_se": nan, "kid": nan, "kid_std": nan, "precision": nan, "recall": nan}
        try:
            out["fid"] = frechet_distance(s.mu, s.sigma, ref.mu, ref.sigma)
            out["fid_se"] = bootstrap_fid_se(f, ref.mu, ref.sigma, seed=seed, device=device)
        except (ValueError, np.linalg.LinAlgError, torch.linalg.LinAlgError):  # e.g. non-finite features
            pass
        real = ref.features
        if real is not None and np.isfinite(f).all():
            out["kid"], out["kid_std"] = kernel_inception_distance(f, real, num_subsets=KID_SUBSETS,
                                                                   subset_size=1000, seed=seed)
            real = real[: len(f)]
            if min(len(f), len(real)) > PR_K:
                out["precision"], out["recall"] = precision_recall(real, f, k=PR_K, device=device)
        return out


def bootstrap_fid_se(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, *,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, device: str | torch.device = "cpu",
                     use_torch: bool | None = None) -> float:
    """Bootstrap standard error of FID over resamples (with replacement) of the sample rows ``features`` [K, D].

    Each resample's trace term uses ``tr((S_b S_ref)^{1/2}) = sum sqrt(eig(A S_b A))`` with ``A = S_ref^{1/2}``
    computed once (``A S_b A`` is symmetric and similar to ``S_b S_ref``), so a resample costs one symmetric
    eigen-decomposition: float64 numpy on the CPU, float64 torch on an accelerator ``device`` (``use_torch``
    None; True / False force it).  Resample indices come from ``np.random.default_rng(seed)``.
    """
    dev = torch.device(device)
    xp = np if not (dev.type != "cpu" if use_torch is None else use_torch) else None

    def arr(a):
        a = np.asarray(a, np.float64)
        return a if xp is np else torch.as_tensor(a, device=dev)

    eigh, eigvalsh = (np.linalg.eigh, np.linalg.eigvalsh) if xp is np else (torch.linalg.eigh, torch.linalg.eigvalsh)
    x, mu_r, s_r = arr(features), arr(mu_ref), arr(sigma_ref)
    w, v = eigh((s_r + s_r.T) / 2)
    a = (v * (w.clip(0) ** 0.5)) @ v.T
    rng = np.random.default_rng(seed)
    n = len(x)
    fids = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        xb = x[idx if xp is np else torch.as_tensor(idx, device=dev)]
        c = xb - xb.mean(0)
        s_b = c.T @ c / (n - 1)
        m = a @ s_b @ a
        tr_sqrt = (eigvalsh((m + m.T) / 2).clip(0) ** 0.5).sum()
        d = xb.mean(0) - mu_r
        fids.append(float(d @ d + s_b.trace() + s_r.trace() - 2 * tr_sqrt))
    return float(np.std(fids, ddof=1)) if len(fids) > 1 else float("nan")


# ---------------------------------------------------------------------------------------------
# what the reference is
# ---------------------------------------------------------------------------------------------
def _fingerprint(path: Path) -> str:
    """``files:count:bytes:newest mtime_ns`` of a folder (recursive) or a file: changes when its content is
    replaced, without reading it."""
    if path.is_file():
        st = path.stat()
        return f"file:{st.st_size}:{st.st_mtime_ns}"
    count = size = newest = 0
    for root, _, files in os.walk(path):
        for name in files:
            st = os.stat(os.path.join(root, name))
            count, size, newest = count + 1, size + st.st_size, max(newest, st.st_mtime_ns)
    return f"folder:{count}:{size}:{newest}"


def describe_source(ref: str, data: DataConfig, image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """The cache key of a reference (without the extractor): ``{"source", "fingerprint", "image_shape"}``.

    ``image_shape``: (H, W, C) of the run's images.  Raises a one-line ConfigError for a path that does not exist.
    """
    ref = ref.strip()
    if ref == "":
        where = str(data.data_dir or "").strip()
        if where in ("", "digits"):
            source, fingerprint = "train:digits", "digits:train"
        else:
            p = Path(os.path.expanduser(where)).resolve()
            source, fingerprint = f"train:{p}", _fingerprint(p) if p.exists() else "missing"
    elif ref in DIGITS_SOURCES:
        source, fingerprint = ref, ref.replace("-", ":")
    else:
        p = Path(os.path.expanduser(ref))
        if not p.exists():
            raise ConfigError(f"--eval_ref {ref}: no such file or folder; give an image folder, an .npz of images or "
                              f"of statistics, {', '.join(DIGITS_SOURCES)}, or nothing for the training data")
        source, fingerprint = str(p.resolve()), _fingerprint(p.resolve())
    return {"format": FORMAT, "source": source, "fingerprint": fingerprint, "image_shape": list(image_shape)}


def extractor_for(ref: str, image_shape: tuple[int, int, int]) -> str:
    """The feature network ``iddpm eval --extractor auto`` would use for this run's samples against ``ref``:
    ``digits`` (the digits CNN) for 8x8 grayscale images or statistics saved with it, else ``inception``."""
    p = Path(os.path.expanduser(ref.strip())) if ref.strip() else None
    probe = load_stats(p, flag="--eval_ref") if p is not None and is_stats_file(p) else np.zeros((1, *image_shape),
                                                                                                   np.uint8)
    return _auto_extractor(probe)  # the very rule of iddpm eval (iddpm.eval.evaluate)


def _reference_images(ref: str, data: DataConfig, image_shape: tuple[int, int, int]):
    """uint8 [N, H, W, C] images (a list-like for the training data) or saved :class:`FeatureStats`."""
    h, w, c = image_shape
    if ref.strip() == "":
        ds = load_dataset(data, h, c, split="train", with_labels=False)
        return _DatasetImages(ds)
    item = load_source(ref, "--eval_ref")
    if isinstance(item, FeatureStats):
        return item
    if item.shape[1:] != (h, w, c):
        got = "x".join(str(s) for s in item.shape[1:])
        raise ConfigError(f"--eval_ref {ref}: images are {got}, the run makes {h}x{w}x{c}; give reference images of "
                          "the run's size (or their saved statistics)")
    return item


class _DatasetImages:
    """``images[idx]`` -> uint8 [n, H, W, C] of a training dataset (preprocessed, not flipped)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        return np.stack([self.ds.load_uint8(int(i)) for i in idx])


def _compute(images, extractor, log: Log) -> FeatureStats:
    """Streaming statistics of ``extractor`` features over ``images`` (at most MAX_REF_IMAGES, in a fixed random
    order, so the first MAX_REF_FEATURES rows kept are a uniform random subset)."""
    n = len(images)
    if n < 2:
        raise ConfigError(f"--eval_ref: {n} reference image(s); FID needs at least 2")
    order = np.random.default_rng(_SEED).permutation(n)[:MAX_REF_IMAGES]
    if log:
        log(f"reference statistics: {len(order)} images through {extractor.name} (once; cached in {REF_FILE})")
    shift = s1 = s2 = None
    kept: list[np.ndarray] = []
    for i in range(0, len(order), _CHUNK):
        f = np.asarray(extractor(images[order[i: i + _CHUNK]])[0], dtype=np.float64)
        if shift is None:  # accumulate around the first chunk's mean: no cancellation in sigma
            shift, s1, s2 = f.mean(0), np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        x = f - shift
        s1 += x.sum(0)
        s2 += x.T @ x
        if sum(len(k) for k in kept) < MAX_REF_FEATURES:
            kept.append(f)
    m, count = s1 / len(order), len(order)
    sigma = (s2 - count * np.outer(m, m)) / (count - 1)
    feats = np.concatenate(kept)[:MAX_REF_FEATURES]
    return FeatureStats(mu=shift + m, sigma=(sigma + sigma.T) / 2, num=count, extractor=extractor.name,
                        features=feats)


def _save(path: Path, stats: FeatureStats, meta: dict[str, Any]) -> None:
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "num": np.int64(stats.num), "extractor": np.str_(stats.extractor),
              "meta": np.str_(json.dumps(meta, sort_keys=True))}
    if stats.features is not None:
        arrays["features"] = stats.features.astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _cached_meta(path: Path) -> dict[str, Any] | None:
    """The ``meta`` record of an existing cache file, or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            return json.loads(str(f["meta"])) if "meta" in f.files else None
    except Exception:  # a damaged or foreign file: recomputed
        return None


def load_or_compute_reference(run_dir: str | os.PathLike, ref: str, data: DataConfig,
                              image_shape: tuple[int, int, int], extractor, *, extractor_id: str = "",
                              log: Log = None) -> Reference:
    """The :class:`Reference` of ``ref`` (see the module docstring) under ``extractor``, from
    ``RUN_DIR/ref_stats.npz`` when its record matches, else computed and written there (atomically).

    ``extractor_id``: what identifies the network beyond its name (e.g. the Inception file); part of the record.
    Saved statistics (``ref`` a statistics .npz) must come from the same feature network (one-line ConfigError).
    """
    path = Path(run_dir) / REF_FILE
    meta = {**describe_source(ref, data, image_shape), "extractor": extractor.name, "extractor_id": extractor_id}
    cached = _cached_meta(path)
    if cached is not None and {k: v for k, v in cached.items() if k != "num"} == meta:
        stats = load_stats(path, flag="--eval_ref (cached)")
        if log:
            log(f"reference statistics: reused {path} ({cached.get('num', stats.num)} images, {meta['source']})")
        return Reference(stats=stats, meta=cached, path=path, reused=True)
    if cached is not None and log:
        log(f"reference statistics: {path} was computed from {cached.get('source')} with {cached.get('extractor')}; "
            "recomputing")
    item = _reference_images(ref, data, image_shape)
    if isinstance(item, FeatureStats):
        if item.extractor and item.extractor != extractor.name:
            raise ConfigError(f"--eval_ref {ref}: statistics of extractor {item.extractor!r}; this run's samples go "
                              f"through {extractor.name!r}; save statistics with that network")
        stats = item
    else:
        stats = _compute(item, extractor, log)
    meta["num"] = int(stats.num)
    _save(path, stats, meta)
    return Reference(stats=load_stats(path, flag="--eval_ref (cached)"), meta=meta, path=path)
