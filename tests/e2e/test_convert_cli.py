"""``iddpm convert-openai``: original-format weights -> iddpm model file -> identical outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from iddpm.checkpoints.model_file import load_model_file, read_model_file
from iddpm.cli.main import main

# fixture a of ../shared/reference as iddpm flags (UNetModel in 3, out 6, 32 ch, mult 1,2, attention at 8x8)
FIXTURE_A_FLAGS = ["--image_size", "16", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
                   "--attention_resolutions", "8", "--num_heads", "2", "--learn_sigma", "True",
                   "--use_scale_shift_norm", "True", "--diffusion_steps", "1000"]


@pytest.fixture()
def fixture_a(reference_dir):
    from safetensors.torch import load_file

    tensors = load_file(str(reference_dir / "unet_fixture_a_uncond_learnsigma.safetensors"))
    weights = {k: v for k, v in tensors.items() if not k.startswith("__")}  # float16, original key names
    return weights, tensors


def test_convert_fixture_round_trip(tmp_path, fixture_a, capsys):
    weights, tensors = fixture_a
    pt = tmp_path / "fixture_a.pt"
    torch.save(weights, pt)
    out = tmp_path / "converted.safetensors"
    assert main(["convert-openai", str(pt), "-o", str(out), *FIXTURE_A_FLAGS]) == 0
    assert "wrote" in capsys.readouterr().out
    model, cfg = load_model_file(out)
    assert cfg.model.num_channels == 32 and cfg.diffusion.learn_sigma and cfg.diffusion.diffusion_steps == 1000
    _, _, meta = read_model_file(out)
    assert meta["source"] == "fixture_a.pt"
    with torch.no_grad():
        got = model(tensors["__input__.x"], tensors["__input__.timesteps"])
    torch.testing.assert_close(got, tensors["__output__.out"], atol=1e-4, rtol=1e-4)
    # identical to the same weights loaded straight into the network
    from iddpm.build import build_model

    direct = build_model(cfg).eval()
    direct.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(got, direct(tensors["__input__.x"], tensors["__input__.timesteps"]),
                                   atol=0, rtol=0)


def test_convert_mismatch_fails_with_keys_and_preset(tmp_path, capsys):
    from iddpm.build import build_model
    from iddpm.config import preset

    with torch.device("meta"):
        layout_model = build_model(preset("digits"))
    torch.manual_seed(0)
    sd = {k: torch.randn(v.shape) * 0.01 for k, v in layout_model.state_dict().items()}
    pt = tmp_path / "digits_like.pt"
    torch.save(sd, pt)
    out = tmp_path / "x.safetensors"
    assert main(["convert-openai", str(pt), "--preset", "cifar-small", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not match the model of preset cifar-small" in err and "it fits --preset digits" in err
    assert "missing:" in err and "input_blocks.0.0.weight" in err
    assert not out.exists()
    # without --preset the fitting preset is found from the layout
    assert main(["convert-openai", str(pt), "-o", str(out), "--sidecar"]) == 0
    assert "using --preset digits" in capsys.readouterr().out
    assert json.loads((tmp_path / "config.json").read_text())["preset"] == "digits"
    assert main(["convert-openai", str(pt), "-o", str(out)]) == 2  # exists
    assert "--force" in capsys.readouterr().err


@pytest.mark.slow
def test_convert_subprocess_entry_point(tmp_path, fixture_a):
    weights, _ = fixture_a
    pt = tmp_path / "a.pt"
    torch.save(weights, pt)
    proc = subprocess.run([sys.executable, "-m", "iddpm", "convert-openai", str(pt), *FIXTURE_A_FLAGS],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "a.safetensors").is_file()
