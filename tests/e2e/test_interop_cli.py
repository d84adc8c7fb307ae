"""``iddpm export diffusers`` / ``iddpm import diffusers``: run -> DDPMPipeline folder -> iddpm model file -> sample."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import random_weights, tiny_cfg

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'iddpm[diffusers]')")

from iddpm.build import build_model  # noqa: E402
from iddpm.checkpoints.model_file import read_model_file, save_model_file  # noqa: E402
from iddpm.cli.main import main  # noqa: E402

diffusers.utils.logging.set_verbosity_error()

TINY = dict(num_heads=2, rescale_timesteps=False)  # on top of helpers.TINY_MODEL


def make_run(root, **kw):
    """A run directory: config.json, checkpoints/step_*/{model, ema_0.9999}.safetensors (different weights)."""
    cfg = tiny_cfg(**dict(TINY, **kw))
    step = root / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    raw, ema = random_weights(cfg, seed=1), random_weights(cfg, seed=2)
    save_model_file(step / "model.safetensors", raw, cfg)
    save_model_file(step / "ema_0.9999.safetensors", ema, cfg)
    (root / "config.json").write_text(cfg.to_json())
    return cfg, raw, ema


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cfg, raw, ema = make_run(root)
    (root / "nll.json").write_text(json.dumps({"bpd": 3.2109, "bpd_stderr": 0.0123, "num_examples": 64}))
    return root, cfg, raw, ema


def test_round_trip_and_sample(run_dir, tmp_path, capsys):
    root, cfg, raw, ema = run_dir
    out = tmp_path / "pipe"
    assert main(["export", "diffusers", str(root), str(out)]) == 0
    assert "DDPMPipeline.from_pretrained" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "| NLL (bits/dim) | 3.2109 +- 0.0123 (64 examples, nll.json) |" in card and "| weights | EMA |" in card

    pipe = diffusers.DDPMPipeline.from_pretrained(out)  # EMA weights by default
    model = build_model(cfg).eval()
    model.load_state_dict(ema)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 17])
    with torch.no_grad():
        assert (pipe.unet(x, t).sample - model(x, t)).abs().max().item() <= 1e-5
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=20, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()

    imported = tmp_path / "imported.safetensors"
    assert main(["import", "diffusers", str(out), "--out", str(imported)]) == 0
    assert "iddpm sample --run" in capsys.readouterr().out
    sd, cfg2, meta = read_model_file(imported)
    assert sd.keys() == ema.keys() and all(torch.equal(sd[k], ema[k]) for k in ema)
    assert cfg2.model == cfg.model and cfg2.diffusion.learn_sigma and meta["converted_by"] == "iddpm import diffusers"

    samples = tmp_path / "samples"
    assert main(["sample", "--run", str(imported), "--out", str(samples), "--num_samples", "2",
                 "--timestep_respacing", "5", "--quiet"]) == 0
    with np.load(samples / "samples_2x8x8x1.npz") as z:
        assert z["arr_0"].shape == (2, 8, 8, 1)
    assert main(["nll", "--run", str(imported), "--num_examples", "4", "--batch_size", "4", "--out",
                 str(tmp_path / "nll.json"), "--quiet"]) == 0
    assert np.isfinite(json.loads((tmp_path / "nll.json").read_text())["bpd"])


def test_no_ema_and_refusals(run_dir, tmp_path, capsys):
    root, _, raw, _ = run_dir
    out = tmp_path / "raw"
    assert main(["export", "diffusers", str(root / "checkpoints" / "step_00000001"), str(out), "--no_ema"]) == 0
    imported = tmp_path / "raw.safetensors"
    assert main(["import", "diffusers", str(out), "--out", str(imported)]) == 0
    sd, _, _ = read_model_file(imported)
    assert all(torch.equal(sd[k], raw[k]) for k in raw)
    assert "| weights | raw |" in (out / "README.md").read_text()
    capsys.readouterr()

    assert main(["export", "diffusers", str(root), str(out)]) == 2  # non-empty output folder
    assert "already exists and is not empty" in capsys.readouterr().err
    assert main(["import", "diffusers", str(out), "--out", str(imported)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["import", "diffusers", str(out), "--out", str(imported), "--force"]) == 0

    rescaled = tmp_path / "rescaled"
    make_run(rescaled, rescale_timesteps=True)
    capsys.readouterr()
    assert main(["export", "diffusers", str(rescaled), str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("iddpm export: error: --rescale_timesteps True with --diffusion_steps 20")
    assert "\n" not in err and not (tmp_path / "never").exists()
