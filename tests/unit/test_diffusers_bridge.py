"""The diffusers bridge: iddpm U-Nets exported as DDPMPipeline folders give the same outputs and steps, and come back.

Measured on CPU (float32): UNet2DModel vs iddpm outputs <= 1e-5 (about 8e-6 for outputs of size ~4), float64 <= 1e-12;
DDPMScheduler.step vs ``p_sample`` <= 1e-6 with float64 alphas_cumprod at every t; diffusers' own float32
alphas_cumprod resolves beta_t = 1 - abar_t / abar_{t-1} only to ~1e-7 absolute, which moves the small-t steps by
up to ~7e-4 (pinned below); the whole DDPMPipeline chain (T = 20) matches iddpm's ancestral loop within 1e-5.
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from helpers import random_weights

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'iddpm[diffusers]')")

from iddpm.build import build_diffusion, build_model  # noqa: E402
from iddpm.checkpoints.diffusers_bridge import (  # noqa: E402
    check_exportable,
    export_pipeline,
    import_pipeline,
    scheduler_config,
)
from iddpm.checkpoints.diffusers_unet import UNET2D_DEFAULTS  # noqa: E402
from iddpm.config import ConfigError, RunConfig, apply_overrides, preset  # noqa: E402

diffusers.utils.logging.set_verbosity_error()

BASE = dict(num_channels=32, num_res_blocks=1, channel_mult="1,2", diffusion_steps=1000)
SHAPES = {
    # unconditional RGB, learned sigmas, scale-shift norm, 2 heads, attention at 8x8
    "uncond-rgb-learned": dict(image_size=16, in_channels=3, attention_resolutions="8", num_heads=2,
                               learn_sigma=True, noise_schedule="cosine"),
    # class-conditional grayscale, fixed small sigmas, no scale-shift, one head
    "cond-gray-fixed-small": dict(image_size=8, in_channels=1, attention_resolutions="4", num_heads=1,
                                  class_cond=True, num_classes=10, sigma_small=True, use_scale_shift_norm=False),
    # class-conditional grayscale, learned sigmas, one head at levels of different widths (32 and 64)
    "cond-gray-learned-1head": dict(image_size=8, in_channels=1, attention_resolutions="8,4", num_heads=1,
                                    class_cond=True, num_classes=3, learn_sigma=True),
    # unconditional RGB, fixed large sigmas, three levels, 2 heads of width 32 at both attention levels
    "uncond-rgb-fixed-large": dict(image_size=16, in_channels=3, channel_mult="1,2,2", attention_resolutions="8,4",
                                   num_heads=2, predict_xstart=True),
    # DDPM's CIFAR-10 layout, scaled down: mult 1,2,2,2, attention one level down, one head, no scale-shift
    "ddpm-cifar-layout": dict(image_size=16, in_channels=3, channel_mult="1,2,2,2", attention_resolutions="8",
                              num_heads=1, use_scale_shift_norm=False, dropout=0.1),
}


def make_cfg(**kw) -> RunConfig:
    return apply_overrides(RunConfig(), dict(BASE, **kw)).validate()


@pytest.fixture(scope="module", params=list(SHAPES))
def exported(request, tmp_path_factory):
    """(cfg, iddpm state_dict, iddpm model, export folder) for one shape."""
    torch.manual_seed(0)
    cfg = make_cfg(**SHAPES[request.param])
    sd = random_weights(cfg, seed=1)
    model = build_model(cfg).eval()
    model.load_state_dict(sd)
    folder = export_pipeline(sd, cfg, tmp_path_factory.mktemp(request.param) / "pipe", card={"FID": 12.5})
    return cfg, sd, model, folder


def _inputs(cfg, dtype=torch.float32, n=3):
    g = torch.Generator().manual_seed(2)
    m = cfg.model
    x = torch.randn(n, m.in_channels, m.image_size, m.image_size, generator=g, dtype=dtype)
    t = torch.randint(0, cfg.diffusion.diffusion_steps, (n,), generator=g)
    y = torch.randint(0, m.num_classes, (n,), generator=g) if m.class_cond else None
    return x, t, y


def test_unet_outputs_match(exported):
    cfg, _, model, folder = exported
    pipe = diffusers.DDPMPipeline.from_pretrained(folder)
    unet = pipe.unet.eval()
    x, t, y = _inputs(cfg)
    with torch.no_grad():
        ours, theirs = model(x, t, y=y), unet(x, t, class_labels=y).sample
    assert ours.shape == theirs.shape == (3, cfg.model.in_channels * (2 if cfg.diffusion.learn_sigma else 1),
                                          cfg.model.image_size, cfg.model.image_size)
    assert ours.abs().max() > 0.5  # the outputs depend on the inputs
    assert (ours - theirs).abs().max().item() <= 1e-5
    # in float64 the two networks agree to round-off: the mapping itself is exact
    x64 = x.double()
    with torch.no_grad():
        d64 = (model.double()(x64, t, y=y) - unet.double()(x64, t, class_labels=y).sample).abs().max().item()
    model.float()
    assert d64 <= 1e-12


def test_import_of_export_is_exact(exported):
    cfg, sd, _, folder = exported
    sd2, cfg2 = import_pipeline(folder)
    assert sd2.keys() == sd.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert cfg2.model == cfg.model.__class__(**{**vars(cfg.model), "num_heads_upsample": -1})
    for key in ("diffusion_steps", "noise_schedule", "learn_sigma", "predict_xstart"):
        assert getattr(cfg2.diffusion, key) == getattr(cfg.diffusion, key)
    assert cfg2.diffusion.sigma_small == (cfg.diffusion.sigma_small and not cfg.diffusion.learn_sigma)
    assert cfg2.diffusion.rescale_timesteps is False  # diffusers feeds raw t (the same thing at T = 1000)


def test_folder_layout_and_card(exported):
    cfg, _, _, folder = exported
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert names == ["README.md", "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                     "unet/diffusion_pytorch_model.safetensors"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    card = (folder / "README.md").read_text()
    assert "| FID | 12.5 |" in card and "library_name: diffusers" in card and cfg.to_json() in card
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["flip_sin_to_cos"] is True and unet["freq_shift"] == 0
    assert unet["num_class_embeds"] == (cfg.model.num_classes if cfg.model.class_cond else None)


DIFFUSIONS = {
    "learned-range-cosine": dict(learn_sigma=True, noise_schedule="cosine"),
    "learned-range-linear": dict(learn_sigma=True, noise_schedule="linear"),
    "fixed-small-linear": dict(sigma_small=True, noise_schedule="linear"),
    "fixed-large-cosine": dict(noise_schedule="cosine"),
    "predict-xstart-fixed-large": dict(predict_xstart=True, noise_schedule="linear"),
    "learned-range-T4000": dict(learn_sigma=True, noise_schedule="cosine", diffusion_steps=4000,
                                rescale_timesteps=False),
}


@pytest.mark.parametrize("name", list(DIFFUSIONS))
def test_scheduler_step_matches_p_sample(name):
    cfg = make_cfg(image_size=8, in_channels=3, attention_resolutions="4", **DIFFUSIONS[name])
    diffusion = build_diffusion(cfg.diffusion)
    T = diffusion.num_timesteps
    sched = diffusers.DDPMScheduler(**scheduler_config(cfg.diffusion))
    assert sched.config.num_train_timesteps == T
    assert torch.equal(sched.betas, torch.from_numpy(diffusion.betas).float())  # the run's betas, to float32
    shipped = sched.alphas_cumprod
    exact = torch.cumprod(1 - sched.betas.double(), 0)  # the same betas, accumulated in float64 as iddpm does
    out_c = 6 if cfg.diffusion.learn_sigma else 3
    g = torch.Generator().manual_seed(0)
    worst = {"float64": 0.0, "float32": 0.0}
    for t in [*range(12), *range(12, T, T // 60), T - 1]:
        x = torch.randn(2, 3, 8, 8, generator=g)
        out = torch.randn(2, out_c, 8, 8, generator=g).clamp(-1, 1)  # v in [-1, 1] for learned_range

        def model(*_, out=out, **__):
            return out

        noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(t))
        ours = diffusion.p_sample(model, x, torch.full((2,), t), clip_denoised=True, noise=noise)["sample"]
        for label, table in (("float64", exact), ("float32", shipped)):
            sched.alphas_cumprod = table
            theirs = sched.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
            worst[label] = max(worst[label], (ours - theirs).abs().max().item())
    assert worst["float64"] <= 1e-5, worst
    assert worst["float32"] <= 2e-3, worst  # diffusers' float32 table at small t (see the module docstring)


def test_pipeline_chain_matches_ancestral_loop(tmp_path):
    """``DDPMPipeline(num_inference_steps=N)`` = iddpm's p_sample loop (with ``--timestep_respacing N``)."""
    cfg = make_cfg(image_size=8, in_channels=1, attention_resolutions="4", num_heads=2, learn_sigma=True,
                   diffusion_steps=20, noise_schedule="cosine", rescale_timesteps=False)
    sd = random_weights(cfg)
    model = build_model(cfg).eval()
    model.load_state_dict(sd)
    pipe = diffusers.DDPMPipeline.from_pretrained(export_pipeline(sd, cfg, tmp_path / "p"))
    pipe.set_progress_bar_config(disable=True)
    for steps in (20, 5):
        images = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=steps,
                      output_type="pt").images
        diffusion = build_diffusion(cfg.diffusion, None if steps == 20 else str(steps))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 1, 8, 8, generator=g)
        with torch.no_grad():
            for i in reversed(range(diffusion.num_timesteps)):
                x = diffusion.p_sample(model, x, torch.full((2,), i), generator=g)["sample"]
        assert (images - (x / 2 + 0.5).clamp(0, 1)).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------- refusals
def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("kw, expected", [
    (dict(image_size=16, small_size=8, attention_resolutions="8"), "--small_size 8: super-resolution"),
    (dict(image_size=8, attention_resolutions="4", diffusion_steps=4000), "--rescale_timesteps True with "
                                                                          "--diffusion_steps 4000"),
    (dict(image_size=8, attention_resolutions="8,4", num_heads=2), "--num_heads 2: attention widths/heads 32/2, "
                                                                   "64/2 give head dims [16, 32]"),
    (dict(image_size=8, attention_resolutions="4", num_heads=2, num_heads_upsample=1), "head dims [32, 64]"),
    (dict(image_size=8, channel_mult="2,2", attention_resolutions="4"), "--channel_mult 2,2: UNet2DModel's first"),
])
def test_export_refusals(kw, expected):
    with pytest.raises(ConfigError) as exc:
        check_exportable(make_cfg(**kw))
    assert expected in _one_line(exc)


def test_released_presets():
    check_exportable(preset("lsun_bedroom"))  # T = 1000, one head: exports
    for name, reason in (("cifar10_uncond", "--rescale_timesteps True with --diffusion_steps 4000"),
                         ("imagenet64_uncond", "--rescale_timesteps True"),
                         ("imagenet64_cond", "head dims [144, 192]"), ("upsample256", "--small_size 64")):
        with pytest.raises(ConfigError) as exc:
            check_exportable(preset(name))
        assert reason in _one_line(exc), name


def test_export_refuses_non_empty_folder_and_wrong_weights(tmp_path):
    cfg = make_cfg(image_size=8, in_channels=1, attention_resolutions="4")
    sd = random_weights(cfg)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    with pytest.raises(ConfigError) as exc:
        export_pipeline(sd, cfg, tmp_path / "taken")
    assert "already exists and is not empty" in _one_line(exc)
    assert (tmp_path / "taken" / "x").read_text() == "keep me"
    with pytest.raises(ConfigError) as exc:
        export_pipeline(sd, make_cfg(image_size=8, in_channels=3, attention_resolutions="4"), tmp_path / "new")
    assert "does not match" in _one_line(exc) and not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    assert export_pipeline(sd, cfg, tmp_path / "empty") == tmp_path / "empty"  # an empty folder is fine
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    cfg = make_cfg(image_size=8, in_channels=1, attention_resolutions="4", num_heads=2, learn_sigma=True)
    sd = random_weights(cfg)
    return cfg, sd, export_pipeline(sd, cfg, tmp_path_factory.mktemp("small") / "pipe")


def _edited(folder, tmp_path, file, **changes):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    conf = json.loads((copy / file).read_text())
    conf.update(changes)
    (copy / file).write_text(json.dumps(conf))
    return copy


UNET_JSON, SCHED_JSON = "unet/config.json", "scheduler/scheduler_config.json"


@pytest.mark.parametrize("file, changes, expected", [
    (UNET_JSON, dict(freq_shift=1), "freq_shift=1: iddpm's U-Net needs 0"),
    (UNET_JSON, dict(norm_eps=1e-6), "norm_eps=1e-06: iddpm's GroupNorm uses eps 1e-5"),
    (UNET_JSON, dict(downsample_padding=0), "downsample_padding=0"),
    (UNET_JSON, dict(time_embedding_type="fourier"), "time_embedding_type='fourier'"),
    (UNET_JSON, dict(class_embed_type="timestep"), "class_embed_type='timestep'"),
    (UNET_JSON, dict(attention_head_dim=16, down_block_types=["AttnDownBlock2D"] * 2,
                     up_block_types=["AttnUpBlock2D"] * 2), "attention_head_dim=16: gives different head counts"),
    (UNET_JSON, dict(up_block_types=["UpBlock2D", "UpBlock2D"]), "up_block_types=['UpBlock2D', 'UpBlock2D']"),
    (UNET_JSON, dict(attn_norm_num_groups=None), "attn_norm_num_groups=None"),
    (UNET_JSON, dict(_class_name="UNet2DConditionModel"), "_class_name='UNet2DConditionModel'"),
    (UNET_JSON, dict(block_out_channels=[32, 48]), "block_out_channels=[32, 48]"),
    (SCHED_JSON, dict(variance_type="learned"), "variance_type='learned'"),
    (SCHED_JSON, dict(variance_type="fixed_large"), "out_channels=2 does not fit variance_type='fixed_large'"),
    (SCHED_JSON, dict(prediction_type="v_prediction"), "prediction_type='v_prediction'"),
    (SCHED_JSON, dict(beta_schedule="scaled_linear", trained_betas=None), "beta_schedule='scaled_linear'"),
    (SCHED_JSON, dict(trained_betas=[0.01] * 1000), "trained_betas are neither"),
    (SCHED_JSON, dict(beta_end=0.03, trained_betas=None), "beta_end=0.03"),
    (SCHED_JSON, dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
])
def test_import_refusals(small_export, tmp_path, file, changes, expected):
    folder = _edited(small_export[2], tmp_path, file, **changes)
    with pytest.raises(ConfigError) as exc:
        import_pipeline(folder)
    msg = _one_line(exc)
    assert expected in msg and file.split("/")[-1] in msg


def test_import_refuses_missing_parts(small_export, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    with pytest.raises(ConfigError) as exc:
        import_pipeline(tmp_path / "nowhere")
    assert "no such folder" in _one_line(exc)
    copy = tmp_path / "copy"
    shutil.copytree(small_export[2], copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state.pop("mid_block.attentions.0.to_k.bias")
    save_file(state, str(weights))
    with pytest.raises(ConfigError) as exc:
        import_pipeline(copy)
    assert "mid_block.attentions.0.to_k.bias is missing" in _one_line(exc)
    shutil.rmtree(copy / "scheduler")
    with pytest.raises(ConfigError) as exc:
        import_pipeline(copy)
    assert "no scheduler/scheduler_config.json" in _one_line(exc)


def test_import_of_sin_cos_embedding_and_linear_schedule(small_export, tmp_path):
    """A ``flip_sin_to_cos=False`` UNet2DModel with diffusers' own linear schedule imports exactly."""
    from safetensors.torch import load_file, save_file

    cfg, sd, folder = small_export
    copy = _edited(folder, tmp_path, UNET_JSON, flip_sin_to_cos=False)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    w = state["time_embedding.linear_1.weight"]
    state["time_embedding.linear_1.weight"] = torch.cat([w[:, 16:], w[:, :16]], dim=1)  # same net on [sin, cos]
    save_file(state, str(weights))
    sched = json.loads((copy / SCHED_JSON).read_text())
    sched.update(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    del sched["trained_betas"]
    (copy / SCHED_JSON).write_text(json.dumps(sched))
    unet = diffusers.UNet2DModel.from_pretrained(copy / "unet").eval()
    sd2, cfg2 = import_pipeline(copy)
    assert all(torch.equal(sd[k], sd2[k]) for k in sd) and cfg2.diffusion.noise_schedule == "linear"
    model = build_model(cfg2).eval()
    model.load_state_dict(sd2)
    x, t, _ = _inputs(cfg)
    with torch.no_grad():
        assert (model(x, t) - unet(x, t).sample).abs().max().item() <= 1e-5


def test_defaults_table_matches_diffusers():
    params = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    for key, value in UNET2D_DEFAULTS.items():
        default = params[key].default
        assert (list(default) if isinstance(default, tuple) else default) == value, key


def test_linspace_spacing_is_iddpm_respacing_for_common_counts():
    from iddpm.diffusion.respace import space_timesteps

    for T in (1000, 4000):
        for n in (10, 25, 50, 100, 250, 500):
            sched = diffusers.DDPMScheduler(num_train_timesteps=T, timestep_spacing="linspace")
            sched.set_timesteps(n)
            assert sorted(sched.timesteps.tolist()) == sorted(space_timesteps(T, str(n))), (T, n)
    assert np.all(np.diff(sorted(space_timesteps(1000, "50"))) > 0)


def test_without_diffusers_export_says_how_to_install_and_import_still_works(small_export, tmp_path, monkeypatch):
    import sys

    cfg, sd, folder = small_export
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    with pytest.raises(ConfigError) as exc:
        export_pipeline(sd, cfg, tmp_path / "x")
    assert "pip install 'iddpm[diffusers]'" in _one_line(exc) and not (tmp_path / "x").exists()
    sd2, _ = import_pipeline(folder)  # reading needs only JSON + safetensors
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
