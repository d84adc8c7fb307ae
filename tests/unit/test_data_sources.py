"""Data sources: digits split, image folders (both label conventions), npz, preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from iddpm.config import ConfigError, DataConfig
from iddpm.data import list_image_files, load_dataset, load_digits_split, read_image_folder, read_npz_images
from iddpm.data.preprocess import preprocess_pil


def test_digits_split_sizes_stratified_deterministic():
    tr_x, tr_y = load_digits_split("train")
    te_x, te_y = load_digits_split("test")
    all_x, all_y = load_digits_split("all")
    assert tr_x.shape == (1437, 8, 8) and te_x.shape == (360, 8, 8) and all_x.shape == (1797, 8, 8)
    assert tr_x.dtype == np.uint8 and tr_y.dtype == np.int64
    assert all_x.max() == 255 and all_x.min() == 0
    # every value is round(v*255/16) for an integer v in 0..16
    assert set(np.unique(all_x)) <= {int(round(v * 255 / 16)) for v in range(17)}
    # stratified: each class has ~20% of its images in the test split
    frac = np.bincount(te_y, minlength=10) / np.bincount(all_y, minlength=10)
    assert np.all(np.abs(frac - 0.2) < 0.01)
    # disjoint and covering: the multiset of (image, label) rows matches "all"
    def rows(x, y):
        return sorted(map(bytes, np.concatenate([x.reshape(len(x), -1), y[:, None].astype(np.uint8)], 1)))
    assert rows(np.concatenate([tr_x, te_x]), np.concatenate([tr_y, te_y])) == rows(all_x, all_y)
    again = load_digits_split("test")
    np.testing.assert_array_equal(again[0], te_x)
    np.testing.assert_array_equal(again[1], te_y)
    with pytest.raises(ConfigError):
        load_digits_split("valid")


def test_digits_dataset_items():
    ds = load_dataset(DataConfig(), 8, 1, split="test")
    x, cond = ds[3]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    images, labels = load_digits_split("test")
    np.testing.assert_allclose(x[0].numpy(), images[3] / 127.5 - 1, atol=1e-6)
    assert cond["y"].dtype == torch.int64 and cond["y"].ndim == 0 and int(cond["y"]) == labels[3]
    assert ds.num_classes == 10 and len(ds) == 360
    assert load_dataset(DataConfig(labels="none"), 8, 1)[0][1] == {}
    assert load_dataset(DataConfig(), 8, 1, with_labels=False)[0][1] == {}
    rgb16 = load_dataset(DataConfig(data_dir="digits"), 16, 3)[0][0]
    assert rgb16.shape == (3, 16, 16)
    torch.testing.assert_close(rgb16[0], rgb16[2])


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_image_folder_prefix_labels(tmp_path):
    rng = np.random.default_rng(0)
    names = ["dog_2.png", "cat_1.PNG", "sub/cat_3.jpg", "sub/deep/bird_x.Jpeg", "notes.txt", "noext"]
    for n in names:
        if n.endswith(("txt", "noext")):
            (tmp_path / n).write_text("x")
        else:
            _write(tmp_path / n, rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    files = list_image_files(tmp_path)
    # sorted per folder, sub-folders expanded in place (the original's order)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        "cat_1.PNG", "dog_2.png", "sub/cat_3.jpg", "sub/deep/bird_x.Jpeg"]
    ds = load_dataset(DataConfig(data_dir=str(tmp_path)), 8, 3)
    assert len(ds) == 4 and ds.class_names == ("bird", "cat", "dog") and ds.num_classes == 3
    assert [int(ds[i][1]["y"]) for i in range(4)] == [1, 2, 1, 0]
    x, _ = ds[0]
    assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert load_dataset(DataConfig(data_dir=str(tmp_path), labels="none"), 8, 1)[0][1] == {}
    assert load_dataset(DataConfig(data_dir=str(tmp_path)), 8, 1)[0][0].shape == (1, 8, 8)


def test_image_folder_dirname_labels(tmp_path):
    for cls in ("zebra", "ant"):
        for i in range(2):
            _write(tmp_path / cls / f"{i}_img.png", np.full((8, 8), 10 * i, np.uint8))
    ds = load_dataset(DataConfig(data_dir=str(tmp_path), labels="dirname"), 8, 1)
    assert ds.class_names == ("ant", "zebra")
    assert [int(ds[i][1]["y"]) for i in range(4)] == [0, 0, 1, 1]
    _write(tmp_path / "stray.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ConfigError, match="stray.png"):
        load_dataset(DataConfig(data_dir=str(tmp_path), labels="dirname"), 8, 1)


def test_read_image_folder(tmp_path):
    for i in range(3):
        _write(tmp_path / f"{i}.png", np.full((6, 6), i, np.uint8))
    arr = read_image_folder(tmp_path)
    assert arr.shape == (3, 6, 6, 1) and arr.dtype == np.uint8 and list(arr[:, 0, 0, 0]) == [0, 1, 2]
    _write(tmp_path / "3.png", np.zeros((7, 6), np.uint8))
    with pytest.raises(ConfigError, match="different sizes"):
        read_image_folder(tmp_path)


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(ConfigError, match="no images found"):
        load_dataset(DataConfig(data_dir=str(tmp_path)), 8, 1)
    with pytest.raises(ConfigError, match="not an image folder"):
        load_dataset(DataConfig(data_dir=str(tmp_path / "nope")), 8, 1)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="bad.npz"):
        load_dataset(DataConfig(data_dir=str(bad)), 8, 1)
    np.savez(tmp_path / "float.npz", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ConfigError, match="uint8"):
        read_npz_images(tmp_path / "float.npz")
    np.savez(tmp_path / "named.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ConfigError, match="arr_0"):
        read_npz_images(tmp_path / "named.npz")


def test_npz_dataset(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", imgs, np.array([0, 3, 1, 3, 2]))
    ds = load_dataset(DataConfig(data_dir=str(tmp_path / "s.npz")), 16, 3)
    assert len(ds) == 5 and ds.num_classes == 4
    np.testing.assert_allclose(ds[1][0].numpy(), imgs[1].transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    assert int(ds[1][1]["y"]) == 3
    small = load_dataset(DataConfig(data_dir=str(tmp_path / "s.npz")), 8, 3)
    expect = np.array(Image.fromarray(imgs[2]).resize((8, 8), Image.BOX))  # 16 >= 2*8: one BOX halving
    np.testing.assert_allclose(small[2][0].numpy(), expect.transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    np.savez(tmp_path / "gray.npz", imgs[..., 0])
    g = load_dataset(DataConfig(data_dir=str(tmp_path / "gray.npz")), 16, 1)
    assert g[0][1] == {} and g.num_classes == 0 and g[0][0].shape == (1, 16, 16)


def test_preprocess_big_non_square_matches_direct_computation():
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (203, 301, 3), dtype=np.uint8)  # H=203, W=301
    im = Image.fromarray(arr)
    out = preprocess_pil(im, 32, 3)
    # direct: 301x203 -> BOX 150x101 -> BOX 75x50 (50 < 64 stops) -> BICUBIC to short side 32
    d = im.resize((150, 101), Image.BOX).resize((75, 50), Image.BOX)
    d = np.array(d.resize((round(75 * 32 / 50), 32), Image.BICUBIC))  # 48 x 32
    off = (48 - 32) // 2
    np.testing.assert_array_equal(out, d[:, off : off + 32])
    assert out.shape == (32, 32, 3)
    gray = preprocess_pil(im, 32, 1)
    np.testing.assert_array_equal(gray[..., 0], np.array(Image.fromarray(d).convert("L"))[:, off : off + 32])
    with pytest.raises(ConfigError, match="in_channels"):
        preprocess_pil(im, 32, 2)


def test_random_flip_is_seeded_per_sample_and_epoch(tmp_path):
    imgs = np.arange(64 * 16, dtype=np.uint8).reshape(16, 8, 8) * 3
    np.savez(tmp_path / "a.npz", imgs)
    cfg = DataConfig(data_dir=str(tmp_path / "a.npz"), random_flip=True)
    ds = load_dataset(cfg, 8, 1, seed=5)
    plain = load_dataset(DataConfig(data_dir=str(tmp_path / "a.npz")), 8, 1)
    flips = [[bool(torch.equal(ds[(i, e)][0], plain[i][0].flip(-1))) for i in range(16)] for e in range(3)]
    for e in range(3):
        for i in range(16):
            assert flips[e][i] or torch.equal(ds[(i, e)][0], plain[i][0])
    assert 0 < sum(map(sum, flips)) < 48  # some but not all flipped
    assert flips[0] != flips[1] or flips[1] != flips[2]  # varies across epochs
    ds2 = load_dataset(cfg, 8, 1, seed=5)
    assert all(torch.equal(ds[(i, 1)][0], ds2[(i, 1)][0]) for i in range(16))
