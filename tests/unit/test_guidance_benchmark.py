"""Smoke test of benchmarks/guidance.py ``--quick``: every stage runs and writes well-formed outputs (structure only,
never the benchmark's numbers), and a second run reuses the cached model."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as mp:  # the script imports its sibling speed.py by name
        mp.syspath_prepend(str(ROOT / "benchmarks"))
        return importlib.import_module("guidance")


def test_quick_mode_writes_well_formed_outputs(bench, tmp_path):
    out = tmp_path / "g"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    assert torch.get_num_threads() == 1  # --threads 1 (restored after the test by conftest)
    for name in ("results.json", "table.md", "guidance.png", "samples.png"):
        assert (out / name).is_file(), name
    for png in ("guidance.png", "samples.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    res = json.loads((out / "results.json").read_text())
    for key in ("machine", "command", "settings", "training", "summary", "verdict", "per_seed", "real_train_split"):
        assert key in res, key
    quick = bench.MODES["quick"]
    assert res["training"]["step"] == quick["train_steps"]
    assert len(res["per_seed"]) == len(bench.SAMPLERS) * len(quick["scales"]) * quick["seeds"]
    assert len(res["summary"]) == len(bench.SAMPLERS) * len(quick["scales"])
    for row in res["summary"]:
        assert 0 <= row["accuracy"] <= 1 and row["fid"] >= 0 and row["seeds"] == quick["seeds"]
        if row["W"] == 1.0:
            assert row["d_fid"] == 0.0 and row["d_accuracy"] == 0.0
    assert len(res["verdict"]) == len(bench.SAMPLERS)
    table = (out / "table.md").read_text()
    assert table.count("\n| ancestral |") == len(quick["scales"]) and "real train split" in table

    # the cached model is reused (no training), a different budget is refused
    ckpt = next((out / "run" / "checkpoints").iterdir()) / "model.safetensors"
    before = ckpt.stat().st_mtime_ns
    assert bench.trained_run(out / "run", quick["train_steps"], False, print) == res["training"]
    assert ckpt.stat().st_mtime_ns == before
    with pytest.raises(SystemExit, match="pass --retrain"):
        bench.trained_run(out / "run", quick["train_steps"] + 1, False, print)


def test_scales_must_include_one(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--scales", "0,2"])
