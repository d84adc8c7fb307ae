"""U-Net parity with the original: released-model layouts, forward fixtures, timestep embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from iddpm.api import build_model
from iddpm.config import preset
from iddpm.models import SuperResModel, UNetModel, optimize, timestep_embedding

FIXTURES = ["unet_fixture_a_uncond_learnsigma", "unet_fixture_b_classcond", "unet_fixture_c_superres"]
RELEASED = ["cifar10_uncond", "imagenet64_uncond", "imagenet64_cond", "upsample256", "lsun_bedroom"]


@pytest.fixture(scope="module")
def unet_keys(reference_dir):
    return json.loads((reference_dir / "unet_keys.json").read_text())


@pytest.mark.parametrize("name", RELEASED)
def test_released_layout_and_parameter_count(unet_keys, name):
    ref = unet_keys[name]
    with torch.device("meta"):
        model = build_model(preset(name))
    assert type(model).__name__ == ref["model_class"]
    got = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert got == ref["state_dict"]  # same keys, same order, same shapes
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    args = ref["unet_constructor_args"]
    assert list(model.attention_resolutions) == args["attention_resolutions"]
    assert list(model.channel_mult) == args["channel_mult"]
    assert model.num_heads_upsample == args["num_heads_upsample"]
    assert model.dropout == args["dropout"]


@pytest.mark.parametrize("name", RELEASED)
def test_preset_flags_match_original(unet_keys, name):
    cfg = preset(name)
    ours = {**vars(cfg.model), **vars(cfg.diffusion)}
    for flag, value in unet_keys[name]["flags"].items():
        assert ours["image_size" if flag == "large_size" else flag] == value, flag


def _load_fixture(reference_dir, name):
    from safetensors.torch import load_file

    meta = json.loads((reference_dir / f"{name}.json").read_text())
    tensors = load_file(str(reference_dir / f"{name}.safetensors"))
    cls = {"UNetModel": UNetModel, "SuperResModel": SuperResModel}[meta["class"]]
    args = dict(meta["constructor_args"])
    args["attention_resolutions"] = tuple(args["attention_resolutions"])
    args["channel_mult"] = tuple(args["channel_mult"])
    model = cls(**args)
    weights = {k: v.float() for k, v in tensors.items() if not k.startswith("__")}
    model.load_state_dict(weights, strict=True)
    assert sum(p.numel() for p in model.parameters()) == meta["num_parameters"]
    kwargs = {}
    if "__input__.y" in tensors:
        kwargs["y"] = tensors["__input__.y"]
    if "__input__.low_res" in tensors:
        kwargs["low_res"] = tensors["__input__.low_res"]
    return model.eval(), tensors, kwargs


@pytest.mark.parametrize("name", FIXTURES)
def test_forward_fixture(reference_dir, name):
    model, t, kwargs = _load_fixture(reference_dir, name)
    x, ts = t["__input__.x"], t["__input__.timesteps"]
    with torch.no_grad():
        out = model(x, ts, **kwargs)
        emb = model.embed(ts, kwargs.get("y"))
    torch.testing.assert_close(out, t["__output__.out"], atol=1e-4, rtol=1e-4)
    # bit-exact: same float32 torch ops as the reference
    torch.testing.assert_close(timestep_embedding(ts, model.model_channels), t["__debug__.timestep_embedding"],
                               atol=0, rtol=0)
    torch.testing.assert_close(emb, t["__debug__.emb"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("mode", ["train", "sample"])
def test_forward_fixture_optimized(reference_dir, name, mode):
    model, t, kwargs = _load_fixture(reference_dir, name)
    fast = optimize(model, mode, compile=False).eval()
    with torch.no_grad():
        out = fast(t["__input__.x"], t["__input__.timesteps"], **kwargs)
    assert out.is_contiguous()
    torch.testing.assert_close(out, t["__output__.out"], atol=1e-4, rtol=1e-4)


def test_feature_vectors_fixture_a(reference_dir):
    model, t, _ = _load_fixture(reference_dir, FIXTURES[0])
    with torch.no_grad():
        feats = model.get_feature_vectors(t["__input__.x"], t["__input__.timesteps"])
    assert len(feats["down"]) == 4 and len(feats["up"]) == 4
    for part in ("down", "up"):
        for i, f in enumerate(feats[part]):
            torch.testing.assert_close(f[:1], t[f"__debug__.features.{part}.{i}"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats["middle"][:1], t["__debug__.features.middle"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("key,dim,max_period", [("dim32", 32, 10000), ("dim33", 33, 10000), ("dim128", 128, 10000),
                                                ("dim16.max_period100", 16, 100)])
def test_timestep_embedding(reference_dir, key, dim, max_period):
    ref = np.load(reference_dir / "timestep_embedding.npz")
    ts = torch.from_numpy(ref["timesteps"])
    got = timestep_embedding(ts, dim, max_period)
    assert got.dtype == torch.float32 and got.shape == ref[key].shape
    np.testing.assert_allclose(got.numpy(), ref[key], atol=1e-6, rtol=0)
    if dim % 2:
        assert (got[:, -1] == 0).all()
