"""iddpm.api.load_run / sample / nll on tiny checkpoints: run dirs, step folders, model files, .pt files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL, assert_same_images, random_weights, save_tiny_model, tiny_cfg

from iddpm import api
from iddpm.config import ConfigError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory in the COMMON layout with two steps; the latest has raw + two EMA weight files."""
    root = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(ema_rate="0.9999,0.99")
    (root / "config.json").write_text(cfg.to_json())
    old = root / "checkpoints" / "step_00000005"
    new = root / "checkpoints" / "step_00000010"
    old.mkdir(parents=True)
    new.mkdir(parents=True)
    save_tiny_model(old / "model.safetensors", cfg)
    save_tiny_model(old / "ema_0.9999.safetensors", cfg)
    for name, seed in (("model", 1), ("ema_0.9999", 2), ("ema_0.99", 3)):
        save_tiny_model(new / f"{name}.safetensors", cfg, seed)
    return root


def first_param(model):
    return next(iter(model.state_dict().values()))


def test_run_dir_latest_step_ema_by_default(run_dir):
    model, diffusion, cfg = api.load_run(run_dir)
    assert torch.equal(first_param(model), next(iter(random_weights(cfg, 2).values())))
    assert not model.training
    assert diffusion.num_timesteps == 20 and cfg.model.image_size == 8


def test_raw_weights_and_ema_rate(run_dir):
    cfg = tiny_cfg()
    raw, _, _ = api.load_run(run_dir, use_ema=False)
    assert torch.equal(first_param(raw), next(iter(random_weights(cfg, 1).values())))
    ema99, _, _ = api.load_run(run_dir / "checkpoints" / "step_00000010", ema_rate="0.99")
    assert torch.equal(first_param(ema99), next(iter(random_weights(cfg, 3).values())))
    with pytest.raises(ConfigError, match="available rates: 0.9999, 0.99"):
        api.load_run(run_dir, ema_rate=0.5)


def test_step_folder_and_model_file(run_dir):
    step = run_dir / "checkpoints" / "step_00000005"
    m1, _, _ = api.load_run(step)
    m2, _, _ = api.load_run(step / "model.safetensors")
    assert torch.equal(first_param(m1), first_param(m2))


def test_respacing_and_overrides(run_dir):
    _, d, cfg = api.load_run(run_dir, timestep_respacing="ddim5")
    assert d.num_timesteps == 5 and cfg.diffusion.timestep_respacing == "ddim5"
    _, d2, cfg2 = api.load_run(run_dir, overrides={"timestep_respacing": "4", "rescale_timesteps": False})
    assert d2.num_timesteps == 4 and not cfg2.diffusion.rescale_timesteps
    with pytest.raises(ConfigError, match="--timestep_respacing ddim8: 20 steps cannot"):
        api.load_run(run_dir, timestep_respacing="ddim8")
    with pytest.raises(ConfigError, match="--num_channels"):
        api.load_run(run_dir, overrides={"num_channels": 64})
    with pytest.raises(ConfigError, match="--preset"):
        api.load_run(run_dir, preset="digits")


def test_errors_are_one_line(tmp_path, run_dir):
    with pytest.raises(ConfigError, match="no such file or directory") as e:
        api.load_run(tmp_path / "nope")
    assert "\n" not in str(e.value)
    empty = tmp_path / "emptyrun"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no checkpoints"):
        api.load_run(empty)
    no_ema = tmp_path / "noema"
    no_ema.mkdir()
    save_tiny_model(no_ema / "model.safetensors", tiny_cfg())
    with pytest.raises(ConfigError, match="--no_ema"):
        api.load_run(no_ema)
    assert api.load_run(no_ema, use_ema=False)[2].model.num_channels == 32


def test_original_pt_needs_settings(tmp_path):
    cfg = tiny_cfg()
    sd = random_weights(cfg, 5)
    pt = tmp_path / "model.pt"
    torch.save(sd, pt)
    with pytest.raises(ConfigError, match="--preset"):
        api.load_run(pt)
    model, diffusion, got = api.load_run(pt, overrides=TINY_MODEL)
    assert torch.equal(first_param(model), next(iter(sd.values())))
    assert diffusion.num_timesteps == 20
    with pytest.raises(ConfigError, match="does not match"):
        api.load_run(pt, overrides=dict(TINY_MODEL, num_channels=64))


def test_released_file_name_picks_its_preset(tmp_path):
    pt = tmp_path / "cifar10_uncond_50M_500K.pt"
    torch.save(random_weights(tiny_cfg(), 0), pt)  # the name says cifar10_uncond; the tiny weights do not fit it
    with pytest.raises(ConfigError, match="preset cifar10_uncond"):
        api.load_run(pt)


def test_api_sample_from_run(run_dir):
    a = api.sample(run_dir, num_samples=3, batch_size=2, seed=5, timestep_respacing="5")
    b = api.sample(run_dir, num_samples=3, batch_size=3, seed=5, timestep_respacing="5", fast=False)
    assert a.images.shape == (3, 8, 8, 1) and a.images.dtype == np.uint8 and a.labels is None
    assert_same_images(a.images, b.images)


def test_api_sample_class_conditional(tmp_path):
    cfg = tiny_cfg(class_cond=True, num_classes=4)
    path = save_tiny_model(tmp_path / "c.safetensors", cfg)
    res = api.sample(path, num_samples=5, classes="balanced", timestep_respacing="ddim4", use_ddim=True)
    np.testing.assert_array_equal(res.labels, [0, 1, 2, 3, 0])


def test_api_nll_digits(run_dir):
    res = api.nll(run_dir, num_examples=3, batch_size=2, timestep_respacing="4")
    assert res.num_examples == 3 and res.vb_per_t.shape == (4,)
    assert np.isfinite(res.bpd) and res.bpd > 0
    assert res.bpd == pytest.approx(res.vb_sum + res.prior_bpd, rel=1e-6)


def test_api_with_objects_instead_of_a_run(run_dir):
    model, diffusion, cfg = api.load_run(run_dir)
    with pytest.raises(ConfigError, match="model= and diffusion="):
        api.sample(model=model)
    with pytest.raises(ConfigError, match="image_shape"):
        api.sample(model=model, diffusion=diffusion, num_samples=1)
    with pytest.raises(ConfigError, match="needs cfg="):
        api.sample(model=model, diffusion=diffusion, image_shape=(1, 8, 8), timestep_respacing="4")
    a = api.sample(model=model, diffusion=diffusion, cfg=cfg, timestep_respacing="4", num_samples=2)
    b = api.sample(run_dir, timestep_respacing="4", num_samples=2)
    np.testing.assert_array_equal(a.images, b.images)
    with pytest.raises(ConfigError, match="cfg="):
        api.nll(model=model, diffusion=diffusion)
    r = api.nll(model=model, diffusion=diffusion, cfg=cfg, timestep_respacing="3", num_examples=2)
    assert r.num_examples == 2 and r.vb_per_t.shape == (3,)


def test_default_ema_file_is_the_first_configured_rate(tmp_path):
    cfg = tiny_cfg(ema_rate="0.99,0.9999")
    step = tmp_path / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    save_tiny_model(step / "model.safetensors", cfg)
    save_tiny_model(step / "ema_0.9999.safetensors", cfg, 1)
    save_tiny_model(step / "ema_0.99.safetensors", cfg, 2)
    assert api.pick_weights_file(step).name == "ema_0.99.safetensors"
    model, _, _ = api.load_run(tmp_path)
    assert torch.equal(first_param(model), next(iter(random_weights(cfg, 2).values())))
