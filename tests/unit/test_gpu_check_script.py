"""benchmarks/gpu_check.py: its CPU smoke mode runs every check's code and writes the JSON + markdown report;
without CUDA and without --smoke it says in one line that a GPU is needed and exits 2."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("gpu_check")


def test_smoke_run_writes_report(tmp_path, gpu_check):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        rc = gpu_check.main(["--smoke", "--device", "cpu", "--reps", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = {(c["group"], c["name"]): c for c in data["checks"]}
    assert {c["status"] for c in checks.values()} <= {"pass", "skip"}
    for name in ("train fp32 vs fp64", "train bf16 vs fp64", "train fp16 vs fp64", "fp16 overflow skipped + logged"):
        assert checks[("precision", name)]["status"] == "pass", name
    assert "no CUDA" in checks[("precision", "train tf32 vs fp64")]["detail"]
    assert checks[("compile", "compile train fp32 (eager)")]["status"] == "pass"
    assert checks[("compile", "compile sample fp32 (eager)")]["status"] == "pass"
    assert checks[("sdpa", "sdpa flash_attention bfloat16")]["status"] == "pass"
    assert checks[("sampling", "same seed, batch 8 vs 4")]["status"] == "pass"
    for key in (("distributed", "torchrun iddpm train"), ("distributed", "NCCL probe"), ("resume", "exact resume")):
        assert checks[key]["status"] == "skip" and "no CUDA" in checks[key]["detail"], key
    rows = {(r["mode"], r["variant"]): r for r in data["speed"]}
    assert set(rows) == {(m, v) for m in ("train", "sample") for v in ("fp32", "tf32", "bf16", "bf16+compile",
                                                                       "bf16+compile+cl")}
    for (mode, variant), r in rows.items():
        if variant == "tf32":
            assert r["status"] == "skipped: no CUDA"
        else:
            assert r["status"] == "ok" and r["median"] > 0 and r["fwd_gflop_per_img"] > 0, (mode, variant)
    assert [t["status"] for t in data["targets"]][1] == "n/a"  # no dense peak for a CPU: MFU omitted
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| precision | train fp32 vs fp64 | pass |" in table and "| small | train | bf16+compile+cl | 2 |" in table
    assert "| target | measured | goal | result |" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the no-GPU message does not apply")
def test_without_cuda_it_needs_smoke(gpu_check, capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "GPU" in out[0] and "--smoke" in out[0]
    assert not list(tmp_path.iterdir())


def test_device_peak_lookup(gpu_check):
    """Names as torch.cuda.get_device_name() gives them; more specific models win, MIG slices get no MFU."""
    peaks = gpu_check.speedlib.device_peaks
    assert peaks("NVIDIA H100 80GB HBM3")["label"] == "H100 SXM"
    assert peaks("NVIDIA H100 PCIe")["label"] == "H100 PCIe"
    assert peaks("NVIDIA H100 NVL")["label"] == "H100 NVL"
    assert peaks("NVIDIA H200")["bf16"] == 989.5
    assert peaks("NVIDIA A100-SXM4-80GB")["tf32"] == 156.0
    assert peaks("NVIDIA L4")["label"] == "L4" and peaks("NVIDIA L40S")["label"] == "L40S"
    assert peaks("NVIDIA A10")["label"] == "A10" and peaks("NVIDIA A10G") is None
    assert peaks("NVIDIA H100 80GB HBM3 MIG 1g.10gb") is None and peaks("Tesla V100-SXM2-16GB") is None
