"""Images in, tensors out: image folders, ``.npz`` arrays and the bundled scikit-learn digits.

- :func:`load_dataset` (DataConfig -> dataset of ``(x float32 [C,H,W] in [-1,1], cond)``),
- :func:`make_loader` (sharded, seeded, resumable batches),
- :func:`load_digits_split` (uint8 ``[N,8,8]`` digits of the fixed train/test split),
- :func:`check_image_files` (the scan that skips unreadable files), :func:`to_8bit` (16-bit / float images).
"""

from iddpm.data.dataset import ArrayImageDataset, FolderImageDataset, ImageDataset, load_dataset
from iddpm.data.digits import load_digits_split
from iddpm.data.loader import BatchLoader, make_loader
from iddpm.data.preprocess import preprocess_pil, to_8bit, to_model_range
from iddpm.data.sources import check_image_files, list_image_files, read_image_folder, read_npz_images

__all__ = [
    "ArrayImageDataset",
    "BatchLoader",
    "check_image_files",
    "FolderImageDataset",
    "ImageDataset",
    "list_image_files",
    "load_dataset",
    "load_digits_split",
    "make_loader",
    "preprocess_pil",
    "read_image_folder",
    "read_npz_images",
    "to_8bit",
    "to_model_range",
]
