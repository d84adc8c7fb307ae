"""``iddpm upsample`` on a tiny super-resolution checkpoint (4x4 -> 8x8), from a samples npz."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_same_images, save_tiny_model, tiny_cfg

from iddpm import api
from iddpm.cli.main import main
from iddpm.sample import save_npz

SR = dict(small_size=4, in_channels=3)  # the tiny U-Net as an RGB 4x4 -> 8x8 super-resolution model


def make_sr(path, **kw):
    return save_tiny_model(path, tiny_cfg(**dict(SR, **kw)))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    images = np.random.default_rng(0).integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
    return save_npz(folder, images, np.array([0, 1, 2, 0, 1])), images


def upsample(run, base_npz, out, *extra):
    return main(["upsample", "--run", str(run), "--base_samples", str(base_npz), "--out", str(out), "--quiet",
                 "--timestep_respacing", "4", *extra])


def test_upsample_writes_large_samples_with_labels(tmp_path, base):
    base_npz, images = base
    ckpt = make_sr(tmp_path / "sr.safetensors", class_cond=True, num_classes=3)
    assert upsample(ckpt, base_npz, tmp_path / "out", "--batch_size", "2") == 0
    with np.load(tmp_path / "out" / "samples_5x8x8x3.npz") as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (5, 8, 8, 3)
        np.testing.assert_array_equal(z["arr_1"], [0, 1, 2, 0, 1])
        first = z["arr_0"]
    assert (tmp_path / "out" / "grid.png").is_file()
    info = json.loads((tmp_path / "out" / "sample_info.json").read_text())
    assert info["base_samples"] == str(base_npz)
    # batch-size invariant, and the low-res input matters
    assert upsample(ckpt, base_npz, tmp_path / "b", "--batch_size", "5") == 0
    assert_same_images(np.load(tmp_path / "b" / "samples_5x8x8x3.npz")["arr_0"], first)
    flipped = tmp_path / "flipped"
    save_npz(flipped, 255 - images, np.array([0, 1, 2, 0, 1]))
    assert upsample(ckpt, flipped / "samples_5x4x4x3.npz", tmp_path / "c", "--batch_size", "5") == 0
    assert not np.array_equal(np.load(tmp_path / "c" / "samples_5x8x8x3.npz")["arr_0"], first)


def test_upsample_matches_api_and_num_samples(tmp_path, base):
    base_npz, _ = base
    ckpt = make_sr(tmp_path / "sr.safetensors")
    assert upsample(ckpt, base_npz, tmp_path / "o", "--num_samples", "2", "--use_ddim") == 0
    with np.load(tmp_path / "o" / "samples_2x8x8x3.npz") as z:
        cli = z["arr_0"]
        assert z["arr_1"].tolist() == [0, 1]  # base labels are carried over
    res = api.upsample(ckpt, base_npz, timestep_respacing="4", use_ddim=True)
    assert_same_images(res.images[:2], cli)


def test_upsample_errors(tmp_path, base, capsys):
    base_npz, _ = base
    sr = make_sr(tmp_path / "sr.safetensors")
    wrong = tmp_path / "wrong"
    save_npz(wrong, np.zeros((2, 8, 8, 3), np.uint8))
    assert upsample(sr, wrong / "samples_2x8x8x3.npz", tmp_path / "o") == 2
    assert "images are 8x8x3, the model upsamples 4x4x3" in capsys.readouterr().err
    cond = make_sr(tmp_path / "c.safetensors", class_cond=True, num_classes=3)
    unlabeled = tmp_path / "u"
    save_npz(unlabeled, np.zeros((2, 4, 4, 3), np.uint8))
    assert upsample(cond, unlabeled / "samples_2x4x4x3.npz", tmp_path / "o") == 2
    assert "no arr_1 labels" in capsys.readouterr().err
    base_model = tmp_path / "base.safetensors"
    save_tiny_model(base_model, tiny_cfg(**dict(SR, small_size=0)))
    assert upsample(base_model, base_npz, tmp_path / "o") == 2
    assert "not a super-resolution model" in capsys.readouterr().err
    assert main(["sample", "--run", str(sr), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "iddpm upsample" in capsys.readouterr().err
