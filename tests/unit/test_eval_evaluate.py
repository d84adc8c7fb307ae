"""evaluate(): sources, extractor choice, statistics reuse, skipped metrics."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from iddpm.config import ConfigError
from iddpm.eval.evaluate import evaluate, format_summary, load_source
from iddpm.eval.metrics import FeatureStats


@pytest.fixture()
def sets():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 6, 6, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
    return a, b


def test_identical_sets(sets):
    a, _ = sets
    r = evaluate(a, a.copy(), extractor="random", kid_subsets=5)
    assert r["extractor"].startswith("random-projection") and r["num_samples"] == r["num_reference"] == 40
    assert abs(r["fid"]) < 1e-6
    assert abs(r["kid"]) < 0.05 and r["precision"] == 1.0 and r["recall"] == 1.0
    assert r["is"] == pytest.approx(r["is_reference"]) and r["skipped"] == {}
    assert "FID" in format_summary(r)


def test_different_sets_and_metric_subset(sets):
    a, b = sets
    r = evaluate(a, b, extractor="random", metrics=("fid",))
    assert r["fid"] > 1e-3 and set(r) == {"extractor", "num_samples", "num_reference", "fid", "skipped"}
    with pytest.raises(ConfigError, match="metrics"):
        evaluate(a, b, extractor="random", metrics=("fid", "lpips"))


def test_saved_statistics_reuse(sets, tmp_path):
    a, b = sets
    full = evaluate(a, b, extractor="random", save_reference_stats=tmp_path / "ref.npz", kid_subsets=3)
    r = evaluate(a, str(tmp_path / "ref.npz"), extractor="random")
    assert r["fid"] == pytest.approx(full["fid"], rel=1e-9)
    assert set(r["skipped"]) == {"kid", "pr"} and "is" in r  # samples still have logits
    evaluate(a, b, extractor="random", save_reference_stats=tmp_path / "reff.npz", save_features=True)
    r2 = evaluate(a, str(tmp_path / "reff.npz"), extractor="random", kid_subsets=3)
    assert r2["skipped"] == {} and r2["fid"] == pytest.approx(full["fid"], rel=1e-5)
    assert r2["precision"] == full["precision"] and r2["kid"] == pytest.approx(full["kid"], rel=1e-4)
    # statistics of another extractor are refused
    with pytest.raises(ConfigError, match="extractor"):
        evaluate("digits-test", str(tmp_path / "ref.npz"), extractor="digits")
    # both sides statistics: no extractor needed, FID only
    evaluate(a, b, extractor="random", save_sample_stats=tmp_path / "smp.npz")
    r3 = evaluate(str(tmp_path / "smp.npz"), str(tmp_path / "ref.npz"))
    assert r3["fid"] == pytest.approx(full["fid"], rel=1e-9) and set(r3["skipped"]) == {"kid", "is", "pr"}


def test_sources(sets, tmp_path):
    a, _ = sets
    np.savez(tmp_path / "s.npz", a, np.zeros(len(a), np.int64))
    assert np.array_equal(load_source(str(tmp_path / "s.npz")), a)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(a[i]).save(folder / f"{i}.png")
    assert np.array_equal(load_source(str(folder)), a[:3])
    assert load_source("digits-test").shape == (360, 8, 8, 1)
    assert isinstance(load_source(FeatureStats(np.zeros(2), np.eye(2), 5)), FeatureStats)
    with pytest.raises(ConfigError, match="REFERENCE"):
        load_source(str(tmp_path / "x.txt"), "REFERENCE")
    with pytest.raises(ConfigError, match="at least 2"):
        evaluate(a[:1], a, extractor="random")


def test_auto_uses_digits_classifier_for_digits():
    from iddpm.data import load_digits_split

    x, y = load_digits_split("test")
    same = evaluate(x, "digits-train", metrics=("fid", "is"))
    assert same["extractor"] == "digits-cnn"
    half = evaluate(x[y < 5], "digits-train", metrics=("fid", "is"))
    assert half["fid"] > 20 * same["fid"]  # five missing classes are obvious to the classifier
    assert same["is"] > 1.5 * half["is"]
