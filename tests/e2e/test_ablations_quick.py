"""Smoke test of benchmarks/ablations.py: the tiny ``--smoke`` mode runs every stage and writes well-formed outputs.

Checks structure (files, keys, table rows, PNG signatures), never benchmark numbers.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load_module(name: str = "ablations"):
    """A benchmarks/ module (ablations.py imports its sibling ablations_*.py modules by name, as a script does)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT / "benchmarks"))
        return importlib.import_module(name)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    ablations = _load_module()
    out = tmp_path_factory.mktemp("ablations")
    runs = out / "runs"
    rc = ablations.main(["--smoke", "--out", str(out), "--run_root", str(runs), "--seed", "3"])
    return ablations, out, runs, rc


@pytest.mark.slow
def test_smoke_writes_well_formed_outputs(smoke_run):
    ablations, out, runs, rc = smoke_run
    assert rc == 0
    for name in ("table.md", "results.json", "training_curves.csv", "nll.png", "fid_vs_steps.png",
                 "training_noise.png", "samples.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC, png.name

    res = json.loads((out / "results.json").read_text())
    for key in ("machine", "command", "settings", "seeds", "wall_seconds", "variants", "nll", "sampling",
                "fid_reference", "checks"):
        assert key in res, key
    assert res["machine"]["torch_threads"] == 1 and res["machine"]["cores"] >= 1
    assert "--smoke" in res["command"]
    assert res["seeds"]["train"] == 3 and res["settings"]["seed"] == 3
    assert set(res["wall_seconds"]) == {"train", "nll", "sampling", "total"}

    names = {v.name for v in ablations.VARIANTS}
    assert set(res["variants"]) == names
    for rec in res["variants"].values():
        assert rec["steps"] == res["settings"]["steps"] and rec["error"] is None
        assert len(rec["noise_scale"]) >= 1 and "b_simple" in rec["noise_scale"][0]
        assert {"mean", "std", "cv", "n"} <= set(rec["loss_second_half"])
    # every trained model has an NLL; L_simple also with sigma^2 = beta-tilde
    assert set(res["nll"]) == names | {"simple_cosine_small"}
    for rec in res["nll"].values():
        assert math.isfinite(rec["bpd"]) and rec["bpd"] > 0
        assert rec["num_examples"] == res["settings"]["nll_examples"]
        assert rec["num_timesteps"] == res["settings"]["diffusion_steps"]
    # one FID point per (sampler, steps)
    grid = {(r["sampler"], r["steps"]) for r in res["sampling"]}
    assert grid == {(s[0], k) for s in ablations.SAMPLERS for k in res["settings"]["sample_step_list"]}
    for r in res["sampling"]:
        assert r["sec_per_1000_samples"] > 0 and "fid_bootstrap_se" in r
        assert "features" not in r and "images" not in r
        assert r["respacing"] == (f"ddim{r['steps']}" if r["sampler"] == "simple_ddim" else str(r["steps"]))
    assert all({"claim", "measured", "verdict"} <= set(c) for c in res["checks"]) and res["checks"]

    rows = list(csv.DictReader((out / "training_curves.csv").open()))
    assert len(rows) == len(names) * res["settings"]["steps"]
    assert {r["variant"] for r in rows} == names

    table = (out / "table.md").read_text()
    assert table.startswith("# Paper in miniature")
    for v in ablations.VARIANTS:
        assert f"| {v.label}" in table
    for label in (s[1] for s in ablations.SAMPLERS):
        assert f"| {label} |" in table
    assert "| paper's finding | miniature | verdict |" in table
    # the run directories are real training runs (checkpoint + per-step metrics)
    for name in names:
        assert (runs / name / "config.json").is_file()
        assert len((runs / name / "metrics.csv").read_text().splitlines()) == res["settings"]["steps"] + 1


def test_helpers_known_answers():
    ablations, stats = _load_module(), _load_module("ablations_stats")
    s = stats.spread([1.0, 3.0])
    assert s["mean"] == 2.0 and abs(s["std"] - math.sqrt(2)) < 1e-12 and abs(s["cv"] - math.sqrt(2) / 2) < 1e-12
    assert stats.verdict(-0.5, 0.1, expect_negative=True) == "agrees"
    assert stats.verdict(0.5, 0.1, expect_negative=True) == "disagrees"
    assert stats.verdict(0.1, 0.1, expect_negative=True) == "within noise"
    assert ablations.auto_ema_rate(1000) == "0.9950" and ablations.auto_ema_rate(10) == "0.9000"
    import numpy as np
    import torch

    from iddpm.eval.metrics import feature_stats

    rng = np.random.default_rng(0)
    ref = feature_stats(rng.standard_normal((200, 4)))
    feats = rng.standard_normal((50, 4)) + 0.5
    same = stats.paired_fid_diff(feats, feats, ref, num_boot=10, seed=0)
    assert same["diff"] == 0.0 and same["stderr"] == 0.0
    shifted = stats.paired_fid_diff(feats + 3.0, feats, ref, num_boot=10, seed=0)
    assert shifted["diff"] > 4 * shifted["stderr"] > 0

    # identical batch gradients -> no noise
    g = torch.tensor([[3.0, 4.0]] * 4, dtype=torch.float64)
    assert stats.noise_scale_from_grads(g, 8)["b_simple"] == 0.0
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 2.0], [-1.0, 2.0]], dtype=torch.float64)
    ns = stats.noise_scale_from_grads(g, 2)
    tr_batch = 8.0 / 3.0  # mean (0, 1); every |G_i - mean|^2 = 2, sum 8, over K - 1 = 3
    assert abs(ns["tr_sigma"] - 2 * tr_batch) < 1e-12
    assert abs(ns["g2"] - (1.0 - tr_batch / 4)) < 1e-12
    assert abs(ns["b_simple"] - 16.0) < 1e-12  # B * tr_batch / (|mean|^2 - tr_batch / K) = 2 * (8/3) / (1/3)
