"""Datasets of ``(x float32 [C, H, W] in [-1, 1], cond)`` items, and :func:`load_dataset`.

``cond`` is ``{"y": int64 scalar tensor}`` when the data has labels (and they are wanted),
else ``{}`` -- the original's ``load_data`` contract.  An item may be fetched with a plain index
or with ``(index, epoch)`` (what :func:`iddpm.data.loader.make_loader` passes): the optional
random horizontal flip is then drawn from ``(seed, epoch, index)`` alone, so it is the same in
every worker / rank layout and no global RNG is touched.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from iddpm.config import ConfigError
from iddpm.data.digits import DIGITS_NUM_CLASSES, load_digits_split
from iddpm.data.preprocess import preprocess_array, preprocess_pil, to_model_range
from iddpm.data.sources import check_image_files, folder_labels, image_problem, list_image_files, read_npz_images

__all__ = ["ImageDataset", "ArrayImageDataset", "FolderImageDataset", "load_dataset", "flip_decision"]


def flip_decision(seed: int, epoch: int, index: int) -> bool:
    """Whether item ``index`` is mirrored in ``epoch`` (probability 1/2, a pure function of its arguments)."""
    return bool(np.random.default_rng([int(seed), int(epoch), int(index)]).random() < 0.5)


class ImageDataset(Dataset):
    """Common part: labels, optional seeded flip, conversion to the model range.

    Attributes:
        image_size, in_channels: output shape is ``[in_channels, image_size, image_size]``.
        labels: int64 ``[N]`` or None.  num_classes: number of classes (0 without labels).
        class_names: tuple of class names (index = class id) or ``()``.
    """

    accepts_epoch_index = True  # make_loader passes (index, epoch)

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        labels: np.ndarray | None,
        class_names: tuple[str, ...] = (),
        num_classes: int | None = None,
        random_flip: bool = False,
        seed: int = 0,
        source: str = "",
    ):
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.class_names = tuple(class_names)
        if num_classes is None:
            num_classes = 0 if self.labels is None else int(self.labels.max()) + 1
        self.num_classes = int(num_classes)
        self.random_flip = bool(random_flip)
        self.seed = int(seed)
        self.source = source

    def load_uint8(self, index: int) -> np.ndarray:
        """Image ``index`` preprocessed to uint8 ``[image_size, image_size, in_channels]`` (no flip)."""
        raise NotImplementedError

    def __getitem__(self, index):
        if isinstance(index, (tuple, list)):
            index, epoch = index
        else:
            epoch = 0
        index = int(index)
        arr = self.load_uint8(index)
        if self.random_flip and flip_decision(self.seed, epoch, index):
            arr = arr[:, ::-1]
        cond = {} if self.labels is None else {"y": torch.tensor(int(self.labels[index]), dtype=torch.int64)}
        return to_model_range(arr), cond

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.source!r}, n={len(self)}, size={self.image_size}, "
            f"channels={self.in_channels}, classes={self.num_classes}, flip={self.random_flip})"
        )


class ArrayImageDataset(ImageDataset):
    """Images held in memory (npz, digits), preprocessed once at construction.

    Args:
        images: uint8 ``[N, H, W]`` or ``[N, H, W, C]``; resized with the original's pipeline when
            they are not ``image_size`` square or have another channel count.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, *, image_size: int, in_channels: int, **kw):
        super().__init__(image_size=image_size, in_channels=in_channels, labels=labels, **kw)
        if images.ndim == 3:
            images = images[..., None]
        self.images = np.stack([preprocess_array(a, self.image_size, self.in_channels) for a in images])

    def __len__(self) -> int:
        return len(self.images)

    def load_uint8(self, index: int) -> np.ndarray:
        return self.images[index]


class FolderImageDataset(ImageDataset):
    """Image files read lazily (one ``PIL.Image.open`` per item), preprocessed like the original.

    :func:`load_dataset` passes only files that passed :func:`~iddpm.data.sources.check_image_files`; one that
    still fails to decode (changed since, or a format without a cheap check) raises a one-line ConfigError naming it.
    """

    def __init__(self, files: list[Path], labels: np.ndarray | None, *, image_size: int, in_channels: int, **kw):
        super().__init__(image_size=image_size, in_channels=in_channels, labels=labels, **kw)
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def load_uint8(self, index: int) -> np.ndarray:
        try:
            with Image.open(self.files[index]) as im:
                im.load()
                return preprocess_pil(im, self.image_size, self.in_channels)
        except (OSError, SyntaxError) as exc:  # UnidentifiedImageError, truncated or damaged file
            why = image_problem(self.files[index]) or f"{type(exc).__name__}: {exc}"
            raise ConfigError(f"--data_dir {self.source}: {self.files[index]} cannot be read ({why}); remove or "
                              "replace it") from None


def load_dataset(
    data,
    image_size: int,
    in_channels: int,
    split: str = "train",
    *,
    seed: int = 0,
    with_labels: bool = True,
    warn: Callable[[str], None] | None = None,
) -> ImageDataset:
    """The dataset a :class:`~iddpm.config.DataConfig` describes.

    Args:
        data: DataConfig; ``data_dir`` is ``""``/``"digits"`` (bundled digits, split applies),
            an image folder, or a ``.npz`` file (for these two ``split`` is ignored: the whole
            source is used -- point ``data_dir`` at a held-out folder for evaluation).
        image_size, in_channels: output ``[in_channels, image_size, image_size]``.
        split: ``"train"`` | ``"test"`` | ``"all"`` (digits only).
        seed: seed of the random flip (``data.random_flip``).
        with_labels: False drops labels (``cond == {}``) whatever the source holds; pass
            ``cfg.model.class_cond`` since an unconditional U-Net must not receive ``y``.
        warn: receives the one-line warning about unreadable image files skipped in a folder
            (default: printed to stderr); see :func:`~iddpm.data.sources.check_image_files`.
    """
    source = str(data.data_dir or "").strip()
    kw = dict(image_size=image_size, in_channels=in_channels, random_flip=data.random_flip, seed=seed)
    want_labels = with_labels and data.labels != "none"
    if source in ("", "digits"):
        images, labels = load_digits_split(split)
        return ArrayImageDataset(
            images,
            labels if want_labels else None,
            num_classes=DIGITS_NUM_CLASSES if want_labels else 0,
            class_names=tuple(str(i) for i in range(DIGITS_NUM_CLASSES)) if want_labels else (),
            source=f"digits:{split}",
            **kw,
        )
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        files = check_image_files(list_image_files(path), path, warn=warn)
        labels, names = folder_labels(files, path, data.labels if want_labels else "none")
        return FolderImageDataset(files, labels, class_names=names, num_classes=len(names), source=str(path), **kw)
    if path.suffix.lower() == ".npz":
        images, labels = read_npz_images(path)
        return ArrayImageDataset(images, labels if want_labels else None, source=str(path), **kw)
    raise ConfigError(
        f"--data_dir {source}: not an image folder or .npz file; give a folder of images, an .npz "
        "(arr_0 uint8 NHWC) or 'digits'"
    )
