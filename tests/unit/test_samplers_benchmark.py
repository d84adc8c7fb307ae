"""Smoke test of benchmarks/samplers.py on a tiny existing run: 2 NFE values, 1 seed, 50 samples.

Checks structure (files, keys, the measured grid, the table's sections), never benchmark numbers.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from helpers import random_weights

from iddpm.checkpoints.model_file import save_model_file
from iddpm.config import RunConfig, apply_overrides

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = dict(image_size=8, in_channels=1, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="4", learn_sigma=True, diffusion_steps=12, noise_schedule="cosine",
            rescale_timesteps=True)


def _load(name: str):
    """A benchmarks/ script as a module (it imports its sibling scripts by name, as when run)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT / "benchmarks"))
        return importlib.import_module(name)


def test_samplers_benchmark_smoke(tmp_path, capsys):
    bench = _load("samplers")
    cfg = apply_overrides(RunConfig(), TINY).validate()
    run = save_model_file(tmp_path / "tiny.safetensors", random_weights(cfg), cfg)
    out = tmp_path / "out"
    argv = ["--run", str(run), "--nfe", "3,5", "--seeds", "0", "--num_samples", "50", "--batch_size", "25",
            "--out", str(out)]
    assert bench.main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    labels = {r["label"] for r in data["summary"]}
    assert labels == {"ancestral (learned sigma)", "ddim (eta 0)", "dpm++2m (logsnr)", "dpm++2m (karras)",
                      "dpm++2m (uniform)", "dpm++3m (logsnr)", "dpm++2m-sde (logsnr)", "unipc (logsnr)"}
    grid = {(r["label"], r["nfe"]) for r in data["summary"]}
    assert ("ancestral (learned sigma)", 12) in grid and ("dpm++2m (logsnr)", 12) not in grid  # full T: ancestral
    assert len(grid) == 8 * 2 + 1 and len(data["measurements"]) == 17
    for r in data["summary"]:
        assert r["n_seeds"] == 1 and r["fid"] > 0 and r["s_per_1000"] > 0 and r["fid_se"] is None
    assert data["run"]["T"] == 12 and data["num_samples"] == 50 and data["machine"]["torch_threads"] == 1
    table = (out / "table.md").read_text()
    for section in ("## digit-FID ± SE", "## The issue's targets", "## Deterministic solvers minus"):
        assert section in table
    assert (out / "fid_vs_nfe.png").read_bytes()[:8] == PNG_MAGIC
    assert "Best ancestral FID" in capsys.readouterr().out
    # a rerun measures nothing new: every entry comes from raw.jsonl
    assert bench.main(argv) == 0
    assert "0 entries to measure (17 cached)" in capsys.readouterr().err
