"""Sample files: uint8 conversion, the original's npz layout, grids, per-sample PNGs, trajectories."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from iddpm.config import ConfigError
from iddpm.sample import load_npz, make_grid, npz_name, save_grid, save_npz, save_pngs, save_trajectory, to_uint8


def test_to_uint8_matches_original_formula():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 2.0]).reshape(1, 1, 2, 4)
    got = to_uint8(x)
    # ((x + 1) * 127.5).clamp(0, 255) then truncation toward zero
    assert got.shape == (1, 2, 4, 1) and got.dtype == np.uint8
    assert got.reshape(-1).tolist() == [0, 0, 0, 127, 191, 254, 255, 255]


def test_to_uint8_is_nhwc():
    x = torch.zeros(2, 3, 4, 5)
    x[:, 0] = 1.0  # red channel
    got = to_uint8(x)
    assert got.shape == (2, 4, 5, 3)
    assert (got[..., 0] == 255).all() and (got[..., 1] == 127).all()


def test_npz_layout_and_name(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(6, 8, 4, 3), dtype=np.uint8)
    labels = np.arange(6) % 4
    path = save_npz(tmp_path, images, labels)
    assert path.name == "samples_6x8x4x3.npz" == npz_name(images)
    with np.load(path) as z:
        assert sorted(z.files) == ["arr_0", "arr_1"]
        assert z["arr_0"].dtype == np.uint8 and z["arr_1"].dtype == np.int64
        np.testing.assert_array_equal(z["arr_0"], images)
        np.testing.assert_array_equal(z["arr_1"], labels)
    back, back_labels = load_npz(path)
    np.testing.assert_array_equal(back, images)
    np.testing.assert_array_equal(back_labels, labels)


def test_npz_without_labels_has_only_arr_0(tmp_path):
    images = np.zeros((2, 4, 4, 1), np.uint8)
    path = save_npz(tmp_path / "x.npz", images)
    with np.load(path) as z:
        assert z.files == ["arr_0"]
    assert load_npz(path)[1] is None


def test_load_npz_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.npz"):
        load_npz(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ConfigError, match="bad.npz.*uint8"):
        load_npz(bad)


def test_make_grid_places_tiles():
    images = np.stack([np.full((2, 3, 1), i * 10, np.uint8) for i in range(5)])
    grid = make_grid(images, nrow=3, pad=1, pad_value=255)
    assert grid.shape == (1 + 2 * 3, 1 + 3 * 4, 1)
    assert (grid[1:3, 1:4] == 0).all() and (grid[1:3, 5:8] == 10).all() and (grid[4:6, 5:8] == 40).all()
    assert (grid[4:6, 9:12] == 255).all()  # empty sixth cell


def test_save_grid_png_reads_back(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    path = save_grid(images, tmp_path / "g.png", pad=0, scale=1)
    with Image.open(path) as im:
        arr = np.asarray(im)
    assert arr.shape == (16, 16, 3)
    np.testing.assert_array_equal(arr[:8, 8:], images[1])


def test_save_grid_scales_tiny_images(tmp_path):
    images = np.zeros((1, 8, 8, 1), np.uint8)
    with Image.open(save_grid(images, tmp_path / "g.png", pad=0)) as im:
        assert im.size == (64, 64) and im.mode == "L"


def test_save_pngs_names_and_pixels(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, size=(3, 4, 4, 1), dtype=np.uint8)
    paths = save_pngs(images, tmp_path / "p", labels=np.array([7, 8, 9]))
    assert [p.name for p in paths] == ["000000_7.png", "000001_8.png", "000002_9.png"]
    with Image.open(paths[2]) as im:
        np.testing.assert_array_equal(np.asarray(im), images[2, ..., 0])


def test_trajectory_strip_and_gif(tmp_path):
    frames = np.random.default_rng(3).integers(0, 256, size=(5, 2, 8, 8, 3), dtype=np.uint8)
    strip = save_trajectory(frames, tmp_path / "t.png", scale=1)
    with Image.open(strip) as im:
        arr = np.asarray(im)
    assert arr.shape == (2 + 2 * 10, 2 + 5 * 10, 3)  # one row per sample, one column per frame (pad 2)
    np.testing.assert_array_equal(arr[12:20, 22:30], frames[2, 1])
    gif = save_trajectory(frames, tmp_path / "t.gif", scale=1)
    with Image.open(gif) as im:
        assert im.n_frames >= 5
    with pytest.raises(ValueError, match="strip or gif"):
        save_trajectory(frames, tmp_path / "t.x", fmt="mp4")
