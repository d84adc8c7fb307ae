"""iddpm model files (safetensors + config metadata) and the original's .pt import checks."""

from __future__ import annotations

import json

import pytest
import torch

from iddpm.build import build_model
from iddpm.checkpoints.model_file import FORMAT, load_model_file, read_model_file, save_model_file
from iddpm.checkpoints.openai import (
    check_state_dict,
    describe_state_dict,
    fitting_presets,
    guess_preset,
    load_openai_checkpoint,
    load_openai_state_dict,
    model_layout,
)
from iddpm.config import ConfigError, RunConfig, apply_overrides, preset


def small_cfg() -> RunConfig:
    return apply_overrides(preset("digits"), dict(num_channels=32, num_res_blocks=1), source="test")


def small_model(cfg: RunConfig):
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # nothing zero: every path affects the output
    return model.eval()


def test_save_read_load_round_trip(tmp_path):
    cfg = small_cfg()
    model = small_model(cfg)
    path = save_model_file(tmp_path / "m.safetensors", model.state_dict(), cfg, {"step": "12"}, sidecar=True)
    sd, cfg2, meta = read_model_file(path)
    assert cfg2 == cfg
    assert meta["iddpm_format"] == FORMAT and meta["step"] == "12"
    assert json.loads((tmp_path / "config.json").read_text()) == cfg.to_dict()
    assert sd.keys() == model.state_dict().keys()
    loaded, cfg3 = load_model_file(path)
    assert cfg3 == cfg and not loaded.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in loaded.parameters())
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([5.0, 500.0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), model(x, t), atol=0, rtol=0)


def test_save_rejects_reserved_metadata(tmp_path):
    cfg = small_cfg()
    with pytest.raises(ValueError, match="iddpm_config"):
        save_model_file(tmp_path / "m.safetensors", {"a": torch.zeros(1)}, cfg, {"iddpm_config": "{}"})


def test_read_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such model file"):
        read_model_file(tmp_path / "missing.safetensors")
    pickle_file = tmp_path / "renamed.safetensors"
    torch.save({"a": torch.zeros(2)}, pickle_file)
    with pytest.raises(ConfigError, match="PyTorch zip checkpoint.*convert-openai"):
        read_model_file(pickle_file)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"a": torch.zeros(2)}, str(foreign))
    with pytest.raises(ConfigError, match="without iddpm metadata"):
        read_model_file(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"hello world, not a tensor file")
    with pytest.raises(ConfigError, match="cannot read as safetensors"):
        read_model_file(garbage)


def test_load_model_file_mismatch_names_keys(tmp_path):
    cfg = small_cfg()
    sd = small_model(cfg).state_dict()
    sd.pop("out.2.bias")
    save_model_file(tmp_path / "m.safetensors", sd, cfg)
    with pytest.raises(ConfigError, match="1 missing: out.2.bias"):
        load_model_file(tmp_path / "m.safetensors")


def test_check_state_dict_names_keys_and_fitting_preset():
    with torch.device("meta"):
        sd = build_model(preset("cifar-small")).state_dict()
    check_state_dict(sd, preset("cifar-small"), "x.pt")  # fits: no error
    with pytest.raises(ConfigError) as err:
        check_state_dict(sd, preset("digits"), "x.pt")
    msg = str(err.value)
    assert "\n" not in msg
    assert "x.pt does not match the model of preset digits" in msg
    assert "missing: output_blocks.0.1.norm.weight" in msg
    assert "unexpected: input_blocks.6.0.op.weight" in msg
    assert "shape mismatch: input_blocks.0.0.weight file [64, 3, 3, 3] vs model [64, 1, 3, 3]" in msg
    assert "it fits --preset cifar-small" in msg
    # the preset itself fits, but a flag changed the model
    changed = apply_overrides(preset("cifar-small"), {"num_channels": 128})
    with pytest.raises(ConfigError, match="fits preset cifar-small as is: drop the model flags"):
        check_state_dict(sd, changed, "x.pt")
    # no preset fits: describe the file
    with pytest.raises(ConfigError, match="no preset fits; the file has num_channels=32"):
        check_state_dict(small_model(small_cfg()).state_dict(), preset("digits"), "y.pt")


def test_fitting_presets_for_released_layouts():
    assert fitting_presets(model_layout(preset("imagenet64_cond"))) == ["imagenet64_cond"]
    assert fitting_presets(model_layout(preset("digits"))) == ["digits"]
    text = describe_state_dict(model_layout(preset("upsample256")))
    assert "num_channels=192" in text and "network input channels 6, output channels 6" in text
    assert "class_cond=True with 1000 classes" in text


def test_openai_pt_reading(tmp_path):
    cfg = small_cfg()
    sd = small_model(cfg).state_dict()
    pt = tmp_path / "model.pt"
    torch.save({k: v.half() for k, v in sd.items()}, pt)
    loaded = load_openai_checkpoint(pt, cfg)
    assert all(v.dtype == torch.float32 for v in loaded.values())
    torch.testing.assert_close(loaded["out.2.weight"], sd["out.2.weight"].half().float())
    torch.save({"state_dict": sd, "step": 3}, tmp_path / "nested.pt")
    assert load_openai_state_dict(tmp_path / "nested.pt").keys() == sd.keys()
    with pytest.raises(ConfigError, match="no such checkpoint"):
        load_openai_state_dict(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="bad.pt: not a PyTorch checkpoint"):
        load_openai_state_dict(tmp_path / "bad.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match="not a model state_dict"):
        load_openai_state_dict(tmp_path / "list.pt")


class Arbitrary:
    """A custom class: unpickling it would run project code, so weights_only must refuse it."""


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"a": torch.zeros(1), "obj": Arbitrary()}, path)
    with pytest.raises(ConfigError, match="not a plain state_dict.*Arbitrary.*could run arbitrary code") as e:
        load_openai_state_dict(path)
    msg = str(e.value)
    assert "\n" not in msg and "only if you trust the file" in msg and "weights_only=False" in msg


def test_guess_preset():
    assert guess_preset("/x/imagenet64_cond_270M_250K.pt") == "imagenet64_cond"
    with torch.device("meta"):
        sd = build_model(preset("digits")).state_dict()
    assert guess_preset("mine.pt", sd) == "digits"
    assert guess_preset("mine.pt") is None
