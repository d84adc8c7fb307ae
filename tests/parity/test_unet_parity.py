"""U-Net parity with the original: released-model layouts, forward fixtures, timestep embeddings."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from iddpm.build import build_model
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


EMBEDDINGS = [("dim32", 32, 10000), ("dim33", 33, 10000), ("dim128", 128, 10000), ("dim16.max_period100", 16, 100)]


def _embedding_excess(got, ts, dim: int, max_period: float, ref) -> np.ndarray:
    """|got - ref| beyond 1e-6 + 4 eps32 |arg| per element (0 where within), arg = t * f_i the sin/cos argument.

    Two float32 implementations of the embedding differ in the frequencies f_i = exp(-ln(P) i / half) (exp
    within 1 ulp each: up to 2 eps32 |arg| apart in t * f_i), the rounding of the product t * f_i (1 ulp) and
    the range reduction of sin/cos, which for |arg| ~ 1000 rad costs up to ~ eps32 |arg| in a vectorised float32
    implementation; sin and cos are 1-Lipschitz, so they differ by <= 4 eps32 |arg| plus the outputs' own ulps
    (in 1e-6).  |arg| < 1 keeps ~1e-6; at t = 1000 the bound is 5e-4 (an AMD EPYC differed by 1.5e-5).
    """
    half = dim // 2
    arg = np.abs(np.asarray(ts, dtype=np.float64)[:, None] * np.exp(-math.log(max_period) * np.arange(half) / half))
    arg = np.concatenate([arg, arg] + [np.zeros_like(arg[:, :1])] * (dim % 2), axis=1)  # cos | sin | zero column
    tol = 1e-6 + 4 * 2.0**-23 * arg
    return np.maximum(np.abs(np.asarray(got, dtype=np.float64) - ref) - tol, 0)


@pytest.mark.parametrize("key,dim,max_period", EMBEDDINGS)
def test_timestep_embedding(reference_dir, key, dim, max_period):
    ref = np.load(reference_dir / "timestep_embedding.npz")
    ts = torch.from_numpy(ref["timesteps"])
    got = timestep_embedding(ts, dim, max_period)
    assert got.dtype == torch.float32 and got.shape == ref[key].shape
    excess = _embedding_excess(got.numpy(), ref["timesteps"], dim, max_period, ref[key])
    assert not excess.any(), f"{np.count_nonzero(excess)} of {excess.size} values off, by up to {excess.max()}"
    if dim % 2:
        assert (got[:, -1] == 0).all()


@pytest.mark.parametrize("key,dim,max_period", EMBEDDINGS)
def test_timestep_embedding_tolerance_accepts_exact_maths_and_rejects_bugs(reference_dir, key, dim, max_period):
    ref = np.load(reference_dir / "timestep_embedding.npz")
    t, r = ref["timesteps"].astype(np.float64), ref[key]
    half = dim // 2

    def embed(ts, i, flip=1.0):  # cos | flip * sin of t * f_i in float64, with a zero column for odd dims
        a = ts[:, None] * np.exp(-math.log(max_period) * i / half)
        return np.concatenate([np.cos(a), flip * np.sin(a)] + [np.zeros_like(a[:, :1])] * (dim % 2), axis=1)

    # the exact embedding differs from the float32 one by the rounding of the arguments alone (here by up to
    # 2.4e-4, 0.54 of the tolerance, 16x the AMD mismatch); it must pass ...
    exact = embed(t, np.arange(half))
    assert np.abs(exact - r).max() > 1.5e-5 and not _embedding_excess(exact, t, dim, max_period, r).any()
    # ... and real errors must not: frequencies off by one index, a sign flip, the next timestep
    for bug in (embed(t, np.arange(1, half + 1)), embed(t, np.arange(half), flip=-1.0), embed(t + 1, np.arange(half))):
        assert np.count_nonzero(_embedding_excess(bug, t, dim, max_period, r)) > r.size // 5
