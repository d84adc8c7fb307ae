"""`iddpm eval` end to end on small npz files."""

from __future__ import annotations

import json

import numpy as np

from iddpm.cli.main import main
from iddpm.data import load_digits_split


def test_eval_cli_npz_pair(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", a, np.arange(30) % 3)
    np.savez(tmp_path / "b.npz", a[::-1])
    out = tmp_path / "r.json"
    rc = main(["eval", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--extractor", "random",
               "--kid_subsets", "4", "--json", str(out), "--save_stats", str(tmp_path / "ref.npz"), "--no_progress"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert abs(result["fid"]) < 1e-6 and result["precision"] == 1.0 and result["num_samples"] == 30
    assert "FID" in capsys.readouterr().out
    rc = main(["eval", str(tmp_path / "a.npz"), str(tmp_path / "ref.npz"), "--extractor", "random", "--no_progress"])
    assert rc == 0 and "kid: skipped" in capsys.readouterr().out


def test_eval_cli_digits_reference(tmp_path, capsys):
    x, y = load_digits_split("test")
    np.savez(tmp_path / "samples.npz", x[:, :, :, None], y)  # the layout `iddpm sample` writes
    out = tmp_path / "r.json"
    assert main(["eval", str(tmp_path / "samples.npz"), "digits-test", "--json", str(out), "--no_progress"]) == 0
    result = json.loads(out.read_text())
    assert result["extractor"] == "digits-cnn" and abs(result["fid"]) < 1e-6 and result["recall"] == 1.0


def test_eval_cli_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing.npz"), "digits-test"]) == 2
    assert "missing.npz" in capsys.readouterr().err
    np.savez(tmp_path / "big.npz", np.zeros((4, 16, 16, 3), np.uint8))
    assert main(["eval", str(tmp_path / "big.npz"), str(tmp_path / "big.npz"), "--extractor", "digits"]) == 2
    assert "8x8" in capsys.readouterr().err
    assert main(["eval", "digits-test", "digits-train", "--batch_size", "0"]) == 2
