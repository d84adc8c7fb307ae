"""The bundled default data set: scikit-learn's 8x8 handwritten digits (UCI optdigits test set).

1797 grayscale images of 10 classes, pixel values 0..16 in the original, rescaled here to
0..255 with ``round(v * 255 / 16)``.  A fixed, seeded, stratified 80/20 split (train 1437 /
test 360) is shared by training (``split="train"``), ``iddpm nll`` and ``iddpm eval``
(``split="test"``), so every command sees the same held-out images.  Nothing is downloaded:
the data ships inside scikit-learn.
"""

from __future__ import annotations

import numpy as np

from iddpm.config import ConfigError

__all__ = ["DIGITS_SPLIT_SEED", "DIGITS_NUM_CLASSES", "DIGITS_IMAGE_SIZE", "digits_split_indices", "load_digits_split"]

DIGITS_SPLIT_SEED = 0  # random_state of the stratified split; never change (it defines the test set)
DIGITS_TEST_FRACTION = 0.2
DIGITS_NUM_CLASSES = 10
DIGITS_IMAGE_SIZE = 8
_SPLITS = ("train", "test", "all")


def _load_all() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # why: scikit-learn takes ~1 s to import and only the digits need it

    bunch = load_digits()
    images = np.rint(bunch.images.astype(np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    return images, labels


def digits_split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices of the fixed stratified 80/20 split of ``labels`` [1797]."""
    from sklearn.model_selection import train_test_split  # why: scikit-learn is slow to import (~1 s), digits only

    idx = np.arange(len(labels))
    train, test = train_test_split(
        idx, test_size=DIGITS_TEST_FRACTION, stratify=labels, random_state=DIGITS_SPLIT_SEED, shuffle=True
    )
    return np.sort(train), np.sort(test)


def load_digits_split(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Digits images and labels of one split.

    Args:
        split: ``"train"`` (1437 images), ``"test"`` (360) or ``"all"`` (1797).
    Returns:
        ``(images uint8 [N, 8, 8] in 0..255, labels int64 [N] in 0..9)``, in the data set's
        original order (deterministic; independent of any global RNG).
    """
    if split not in _SPLITS:
        raise ConfigError(f"digits split {split!r}: choose one of {', '.join(_SPLITS)}")
    images, labels = _load_all()
    if split == "all":
        return images, labels
    train, test = digits_split_indices(labels)
    sel = train if split == "train" else test
    return images[sel], labels[sel]
