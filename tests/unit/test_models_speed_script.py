"""benchmarks/speed.py runs end to end on a tiny configuration and writes its table and JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"


def _load():
    spec = importlib.util.spec_from_file_location("iddpm_speed_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_script_digits_smoke(tmp_path):
    speed = _load()
    threads = torch.get_num_threads()
    try:
        rc = speed.main(["--presets", "digits", "--variants", "eager,fast,fast+fusedadam", "--reps", "2",
                         "--warmup", "0", "--train_batch", "4", "--sample_batch", "4", "--threads", "1",
                         "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    data = json.loads((tmp_path / "speed.json").read_text())
    rows = data["rows"]
    got = {(r["mode"], r["variant"]) for r in rows}
    assert got == {("train", "eager"), ("train", "fast"), ("train", "fast+fusedadam"),
                   ("sample", "eager"), ("sample", "fast")}
    for r in rows:
        assert r["n"] == 2 and 0 < r["min"] <= r["median"] <= r["max"]
        assert r["fwd_gflop_per_img"] > 0 and 0 < r["mfu"] < 1
        if r["mode"] == "train":  # counted forward + backward is about 3x the forward
            assert 2 < r["step_gflop"] / (r["fwd_gflop_per_img"] * r["batch"]) < 3.5
    meta = data["meta"]
    assert meta["threads"] == 1 and meta["peak_gflops"] > 0 and meta["torch"] == torch.__version__
    table = (tmp_path / "speed.md").read_text()
    assert "| digits | sample | fast | 4 |" in table and "Load average" in table
