"""Where images come from: recursive image folders (with labels) and ``.npz`` arrays.

Folder listing follows the original's ``_list_image_files_recursively``: the entries of each
folder are visited in sorted order and sub-folders are expanded in place, so the file order is
deterministic.  Labels:

- ``"prefix"`` (the original's convention): the class name is the file name before the first
  underscore (``cat_0001.png`` -> ``cat``); names sorted -> ids 0..K-1;
- ``"dirname"``: the class name is the first sub-folder below the data folder
  (``root/cat/x.png`` -> ``cat``); a file directly in the root is an error;
- ``"none"``: no labels.

``.npz`` files use the original's sample layout: ``arr_0`` uint8 ``[N, H, W, C]`` (or ``[N, H, W]``),
optional ``arr_1`` integer labels ``[N]``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from iddpm.config import ConfigError

__all__ = ["IMAGE_EXTENSIONS", "list_image_files", "folder_labels", "read_npz_images", "read_image_folder"]

IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "gif", "webp", "bmp", "tiff", "tif"})


def list_image_files(data_dir: str | os.PathLike) -> list[Path]:
    """All image files below ``data_dir`` (recursive, case-insensitive extensions, sorted per folder)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ConfigError(f"--data_dir {data_dir}: no such folder; give an image folder, a .npz file or 'digits'")
    results: list[Path] = []

    def visit(folder: Path) -> None:
        for entry in sorted(os.listdir(folder)):
            full = folder / entry
            if full.is_dir():
                visit(full)
            elif "." in entry and entry.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS:
                results.append(full)

    visit(root)
    if not results:
        raise ConfigError(
            f"--data_dir {data_dir}: no images found (looked recursively for "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}); point it at a folder of images"
        )
    return results


def folder_labels(files: list[Path], root: str | os.PathLike, labels: str) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """Class ids ``int64 [N]`` (or None for ``labels="none"``) and the sorted class names."""
    if labels == "none":
        return None, ()
    root = Path(root)
    if labels == "prefix":
        names = [f.name.split("_")[0] for f in files]
    elif labels == "dirname":
        names = []
        for f in files:
            rel = f.relative_to(root)
            if len(rel.parts) < 2:
                raise ConfigError(
                    f"--labels dirname: {f} is not inside a class sub-folder of {root}; "
                    "use one sub-folder per class or --labels prefix/none"
                )
            names.append(rel.parts[0])
    else:
        raise ConfigError(f"--labels {labels!r}: choose prefix, dirname or none")
    classes = tuple(sorted(set(names)))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[n] for n in names], dtype=np.int64), classes


def read_npz_images(path: str | os.PathLike, flag: str = "--data_dir") -> tuple[np.ndarray, np.ndarray | None]:
    """``(images uint8 [N, H, W, C], labels int64 [N] or None)`` from an original-layout ``.npz``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            names = list(f.files)
            images = f["arr_0"] if "arr_0" in names else None
            labels = f["arr_1"] if "arr_1" in names else None
    except Exception as exc:  # zipfile.BadZipFile, pickled data, truncated file, ...
        raise ConfigError(
            f"{flag} {path}: not a readable .npz file ({type(exc).__name__}); save it with np.savez(path, images)"
        ) from None
    if images is None:
        raise ConfigError(
            f"{flag} {path}: no 'arr_0' array (found {', '.join(names) or 'nothing'}); "
            "save images with np.savez(path, images_uint8_NHWC, labels)"
        )
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or len(images) == 0:
        raise ConfigError(
            f"{flag} {path}: arr_0 is {images.dtype} {tuple(images.shape)}; expected non-empty uint8 [N, H, W, C] "
            "with C in 1, 3, 4 (or [N, H, W])"
        )
    if labels is not None:
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise ConfigError(
                f"{flag} {path}: arr_1 is {labels.dtype} {tuple(labels.shape)}; expected non-negative integer labels "
                f"[{len(images)}] (or leave arr_1 out)"
            )
        labels = labels.astype(np.int64)
    return images, labels


def read_image_folder(path: str | os.PathLike, flag: str = "SAMPLES") -> np.ndarray:
    """All images of a folder as uint8 ``[N, H, W, C]`` without resizing (they must share one size).

    Grayscale files give C=1 when every file is grayscale, otherwise everything is read as RGB.
    """
    files = list_image_files(path)
    pils = []
    for f in files:
        with Image.open(f) as im:
            im.load()
            pils.append(im)
    gray = all(im.mode in ("L", "1", "I;16", "I") for im in pils)
    arrs = [np.array(im.convert("L" if gray else "RGB")) for im in pils]
    shapes = {a.shape for a in arrs}
    if len(shapes) != 1:
        raise ConfigError(
            f"{flag} {path}: images have different sizes {sorted(shapes)[:3]}...; resize them to one size first"
        )
    out = np.stack(arrs)
    return out[..., None] if gray else out
