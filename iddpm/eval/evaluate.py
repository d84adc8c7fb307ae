"""``evaluate(samples, reference)``: FID, KID, IS and precision/recall between two image sets.

Sources (``samples`` / ``reference``):

- a uint8 array / tensor ``[N, H, W(, C)]`` or an ``.npz`` in the original's layout (``arr_0`` uint8 NHWC),
- an image folder (files of one size; read without resizing),
- ``"digits-train"`` / ``"digits-test"`` / ``"digits-all"``: the bundled digits split,
- saved feature statistics (an ``.npz`` with ``mu`` and ``sigma``, from ``save_stats`` or
  ``iddpm eval --save_stats``) or a :class:`~iddpm.eval.metrics.FeatureStats`.

Which metrics need what: FID needs only ``(mu, sigma)`` of both sets; KID and precision/recall
need the raw features of both (statistics files keep them only with ``--save_features``); IS
needs class logits of the samples (the digits CNN has them, the fid-helper InceptionV3 does not).
A metric that cannot be computed is listed under ``"skipped"`` with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from iddpm.config import EVAL_METRICS, ConfigError, EvalConfig, replace_checked
from iddpm.data.digits import load_digits_split
from iddpm.data.sources import read_image_folder, read_npz_images
from iddpm.eval.features import make_extractor
from iddpm.eval.metrics import (
    FeatureStats,
    feature_stats,
    frechet_distance,
    inception_score,
    is_stats_file,
    kernel_inception_distance,
    load_stats,
    precision_recall,
    save_stats,
)

__all__ = ["evaluate", "eval_settings", "load_source", "compute_stats", "METRICS", "DIGITS_SOURCES"]

METRICS = EVAL_METRICS
DIGITS_SOURCES = ("digits-train", "digits-test", "digits-all")


def load_source(source: Any, flag: str = "SAMPLES") -> np.ndarray | FeatureStats:
    """A source -> uint8 images ``[N, H, W, C]`` or :class:`FeatureStats` (see the module docstring)."""
    if isinstance(source, FeatureStats):
        return source
    if hasattr(source, "detach") and hasattr(source, "numpy"):  # a torch tensor
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray):
        arr = source[..., None] if source.ndim == 3 else source
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
            raise ConfigError(f"{flag}: expected uint8 images [N, H, W, C in (1, 3)], got {arr.dtype} {arr.shape}")
        return arr
    text = str(source)
    if text in DIGITS_SOURCES:
        return load_digits_split(text.split("-", 1)[1])[0][..., None]
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        return read_image_folder(path, flag=flag)
    if path.suffix.lower() == ".npz":
        if is_stats_file(path):
            return load_stats(path, flag=flag)
        images = read_npz_images(path, flag=flag)[0]
        if images.shape[-1] == 4:
            images = images[..., :3]
        return images
    raise ConfigError(
        f"{flag} {text}: not an .npz, an image folder or {'/'.join(DIGITS_SOURCES)}; "
        "give samples as written by `iddpm sample` (.npz) or a folder of images"
    )


def _auto_extractor(*items: np.ndarray | FeatureStats) -> str:
    for item in items:
        if isinstance(item, FeatureStats) and item.extractor:
            return "digits" if item.extractor.startswith("digits") else "inception"
    for item in items:
        if isinstance(item, np.ndarray):
            return "digits" if item.shape[1:] in ((8, 8, 1),) else "inception"
    return "inception"


def compute_stats(images: np.ndarray, extractor, batch_size: int = 256, progress: bool = False, desc: str = ""):
    """Run ``extractor`` over uint8 ``images`` in batches -> :class:`FeatureStats` (features and logits kept)."""
    if len(images) < 2:
        raise ConfigError(f"{desc or 'images'}: need at least 2 images for statistics, got {len(images)}")
    starts = range(0, len(images), batch_size)
    if progress:
        starts = tqdm(starts, desc=f"features {desc}".strip(), unit="batch", leave=False)
    feats, logits = [], []
    for i in starts:
        f, lg = extractor(images[i : i + batch_size])
        feats.append(f)
        logits.append(lg)
    lg = None if any(x is None for x in logits) else np.concatenate(logits)
    return feature_stats(np.concatenate(feats), extractor=extractor.name, logits=lg)


# The keyword names this function took before EvalConfig existed (and that the original's tools use).
_LEGACY_NAMES = {"inception_path": "inception", "digits_weights": "digits_classifier",
                 "save_reference_stats": "save_stats"}


def eval_settings(settings: EvalConfig | None = None, **overrides: Any) -> tuple[EvalConfig, Any]:
    """``settings`` (default :class:`EvalConfig`) with keyword overrides applied and validated, and the extractor
    object when ``extractor=`` was one (else None).  Accepts the legacy names ``inception_path``,
    ``digits_weights`` and ``save_reference_stats``."""
    extractor_obj = None
    if not isinstance(overrides.get("extractor", ""), str):
        extractor_obj = overrides.pop("extractor")
    if overrides.get("metrics") is not None and not isinstance(overrides["metrics"], str):
        overrides["metrics"] = ",".join(overrides["metrics"])
    values = {_LEGACY_NAMES.get(k, k): ("" if v is None else v) for k, v in overrides.items()}
    values = {k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in values.items()}
    return replace_checked(settings or EvalConfig(), values, "evaluate").validate(), extractor_obj


def evaluate(samples: Any, reference: Any, settings: EvalConfig | None = None, *, progress: bool = False,
             **overrides: Any) -> dict[str, Any]:
    """Compare ``samples`` with ``reference``; returns a JSON-ready dict.

    Keys: ``extractor``, ``num_samples``, ``num_reference``, and per computed metric ``fid``;
    ``kid``, ``kid_std``; ``is``, ``is_std`` (and ``is_reference`` when the reference has
    logits); ``precision``, ``recall``; ``skipped`` maps a metric to why it was not computed.

    settings: an :class:`~iddpm.config.EvalConfig` (its defaults are the defaults); ``overrides`` are its field
    names as keywords (``extractor`` may also be an extractor object; ``metrics`` a tuple), e.g.
    ``evaluate(a, "digits-test", metrics=("fid",))``.  ``extractor``: ``"auto"`` (digits CNN for 8x8 grayscale
    images, InceptionV3 otherwise), ``"digits"``, ``"inception"``, ``"random"`` (tests only).
    ``save_stats`` / ``save_sample_stats`` write statistics files (reusable as a source); ``save_features``
    adds the raw features and logits (needed later for KID, P/R, IS).
    """
    cfg, extractor_obj = eval_settings(settings, **overrides)
    metrics = cfg.metric_names
    smp = load_source(samples, "SAMPLES")
    ref = load_source(reference, "REFERENCE")
    need_extractor = isinstance(smp, np.ndarray) or isinstance(ref, np.ndarray)
    if extractor_obj is None:
        name = _auto_extractor(smp, ref) if cfg.extractor == "auto" else cfg.extractor
        ext = None
        if need_extractor:
            ext = make_extractor(name, inception_path=cfg.inception or None,
                                 digits_weights=cfg.digits_classifier or None, device=cfg.device)
        ext_name = ext.name if ext is not None else next(s.extractor for s in (smp, ref))
    else:
        ext, ext_name = extractor_obj, extractor_obj.name

    def stats_of(item, flag):
        if isinstance(item, FeatureStats):
            if item.extractor and ext_name and item.extractor != ext_name:
                raise ConfigError(
                    f"{flag}: statistics were computed with extractor {item.extractor!r}, not {ext_name!r}; "
                    f"use --extractor to match or recompute them"
                )
            return item
        return compute_stats(item, ext, batch_size=cfg.batch_size, progress=progress, desc=flag.lower())

    s_stats, r_stats = stats_of(smp, "SAMPLES"), stats_of(ref, "REFERENCE")
    if s_stats.mu.shape != r_stats.mu.shape:
        raise ConfigError(f"SAMPLES/REFERENCE: feature sizes differ ({s_stats.mu.shape[0]} vs {r_stats.mu.shape[0]})")
    if cfg.save_stats:
        save_stats(cfg.save_stats, r_stats, include_features=cfg.save_features)
    if cfg.save_sample_stats:
        save_stats(cfg.save_sample_stats, s_stats, include_features=cfg.save_features)

    out: dict[str, Any] = {"extractor": ext_name, "num_samples": s_stats.num, "num_reference": r_stats.num}
    skipped: dict[str, str] = {}
    have_features = s_stats.features is not None and r_stats.features is not None
    no_feat = "needs raw features of both sets; statistics files keep them only with --save_features"
    if "fid" in metrics:
        out["fid"] = frechet_distance(s_stats.mu, s_stats.sigma, r_stats.mu, r_stats.sigma)
    if "kid" in metrics:
        if have_features:
            out["kid"], out["kid_std"] = kernel_inception_distance(
                s_stats.features, r_stats.features, num_subsets=cfg.kid_subsets, subset_size=cfg.kid_subset_size,
                seed=cfg.seed,
            )
            out["kid_subset_size"] = min(cfg.kid_subset_size, len(s_stats.features), len(r_stats.features))
        else:
            skipped["kid"] = no_feat
    if "is" in metrics:
        if s_stats.logits is not None:
            out["is"], out["is_std"] = inception_score(s_stats.logits, splits=cfg.is_splits)
            if r_stats.logits is not None:
                out["is_reference"] = inception_score(r_stats.logits, splits=cfg.is_splits)[0]
        else:
            skipped["is"] = f"needs class logits of the samples; extractor {ext_name!r} gives features only"
    if "pr" in metrics:
        if have_features and min(len(s_stats.features), len(r_stats.features)) > cfg.pr_k:
            out["precision"], out["recall"] = precision_recall(
                r_stats.features, s_stats.features, k=cfg.pr_k, device=cfg.device
            )
            out["pr_k"] = cfg.pr_k
        else:
            skipped["pr"] = no_feat if not have_features else f"needs more than k={cfg.pr_k} images per set"
    out["skipped"] = skipped
    return out


def format_summary(result: dict[str, Any]) -> str:
    """Readable multi-line summary of an :func:`evaluate` result."""
    lines = [
        f"extractor {result['extractor']}: {result['num_samples']} samples vs {result['num_reference']} reference"
    ]
    if "fid" in result:
        lines.append(f"  FID        {result['fid']:.4f}")
    if "kid" in result:
        kid = f"{result['kid']:.6f} +- {result['kid_std']:.6f}"
        lines.append(f"  KID        {kid}  (subsets of {result['kid_subset_size']})")
    if "is" in result:
        ref = f"; reference {result['is_reference']:.4f}" if "is_reference" in result else ""
        lines.append(f"  IS         {result['is']:.4f} +- {result['is_std']:.4f}  ({result['extractor']} logits{ref})")
    if "precision" in result:
        lines.append(f"  precision  {result['precision']:.4f}")
        lines.append(f"  recall     {result['recall']:.4f}  (k={result['pr_k']} nearest-neighbour manifolds)")
    for metric, why in result.get("skipped", {}).items():
        lines.append(f"  {metric}: skipped ({why})")
    return "\n".join(lines)
