"""Run directory: resolution, atomic step folders, keep-last-N, find/load round trips."""

from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from iddpm.checkpoints import run_dir as rd
from iddpm.config import ConfigError, RunConfig, TrainConfig, preset


def _cfg(**train):
    return RunConfig(train=TrainConfig(**train))


def test_resolve_run_dir_precedence():
    now = datetime(2026, 1, 2, 3, 4, 5)
    assert rd.resolve_run_dir(_cfg(run_dir="a/b"), env={"OPENAI_LOGDIR": "x"}) == Path("a/b")
    assert rd.resolve_run_dir(_cfg(), env={"OPENAI_LOGDIR": "x"}) == Path("x")
    assert rd.resolve_run_dir(_cfg(), env={}, now=now) == Path("runs/20260102-030405")


def test_json_round_trip_of_nested_state():
    state = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": torch.tensor([1.5, 2.5]), "c": (1, "x"),
             "d": {3: [1.0, 2.0]}, "e": np.float64(0.25)}
    back = rd.from_jsonable(__import__("json").loads(__import__("json").dumps(rd.to_jsonable(state))))
    assert np.array_equal(back["a"], state["a"]) and back["a"].dtype == np.int64
    assert torch.equal(back["b"], state["b"])
    assert back["c"] == (1, "x") and back["d"] == {3: [1.0, 2.0]} and back["e"] == 0.25


def _model_and_opt():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1)
    m(torch.randn(5, 3)).sum().backward()
    opt.step()
    return m, opt


def _save(run, step, m, opt, keep_last=None):
    cfg = preset("digits")
    return rd.save_checkpoint(run, step, cfg=cfg, model_state=m.state_dict(), ema_states=[(0.999, m.state_dict())],
                              optimizer_state=opt.state_dict(), state={"sampler": {"type": "UniformSampler"},
                                                                       "data": {"epoch": 1, "batch": 2}},
                              keep_last=keep_last)


def test_save_load_round_trip(tmp_path):
    m, opt = _model_and_opt()
    path = _save(tmp_path, 7, m, opt)
    assert path == tmp_path / "checkpoints" / "step_00000007"
    assert sorted(p.name for p in path.iterdir()) == ["ema_0.999.safetensors", "model.safetensors",
                                                       "optimizer.safetensors", "state.json"]
    ck = rd.load_checkpoint(tmp_path)
    assert ck.step == 7 and ck.config == preset("digits")
    for k, v in m.state_dict().items():
        assert torch.equal(ck.model[k], v) and torch.equal(ck.emas[0.999][k], v)
    opt2 = torch.optim.AdamW(m.parameters(), lr=5.0)
    opt2.load_state_dict(ck.optimizer)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for name in a["state"][i]:
            assert torch.equal(a["state"][i][name], b["state"][i][name])
    assert ck.state["data"] == {"epoch": 1, "batch": 2}
    bare = rd.load_checkpoint(path / "model.safetensors")
    assert bare.optimizer is None and bare.step == 7


def test_keep_last_and_find(tmp_path):
    m, opt = _model_and_opt()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, m, opt, keep_last=2)
    assert [s for s, _ in rd.list_checkpoints(tmp_path)] == [3, 4]
    latest = tmp_path / "checkpoints" / "step_00000004"
    assert rd.find_checkpoint(tmp_path) == latest
    assert rd.find_checkpoint(tmp_path / "checkpoints") == latest
    assert rd.find_checkpoint(tmp_path / "checkpoints" / "step_00000003").name == "step_00000003"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no checkpoints"):
        rd.find_checkpoint(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no such"):
        rd.find_checkpoint(tmp_path / "missing")


def test_interrupted_save_leaves_previous_checkpoints(tmp_path, monkeypatch):
    m, opt = _model_and_opt()
    _save(tmp_path, 1, m, opt)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(rd, "split_optimizer_state", boom)
    with pytest.raises(RuntimeError):
        _save(tmp_path, 2, m, opt)
    assert [s for s, _ in rd.list_checkpoints(tmp_path)] == [1]
    assert not any(p.name.startswith(".step_") for p in (tmp_path / "checkpoints").iterdir())


def test_config_json(tmp_path):
    cfg = preset("digits")
    rd.write_config(tmp_path, cfg)
    assert rd.read_config(tmp_path) == cfg
    with pytest.raises(ConfigError, match="config.json"):
        rd.read_config(tmp_path / "nope")
