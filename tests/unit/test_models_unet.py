"""U-Net behaviour on tiny models: builders, memory formats, checkpointing, dims, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_unet as tiny

from iddpm.config import ConfigError
from iddpm.models import SuperResModel, UNetModel, attention_downsample_rates, create_model, sr_create_model


def inputs(n=2, c=3, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g), torch.tensor([3.5, 999.0][:n])


def test_create_model_channel_mult_choices():
    common = dict(num_channels=32, num_res_blocks=1, learn_sigma=True, class_cond=False, use_checkpoint=False,
                  attention_resolutions="16,8", num_heads=1, num_heads_upsample=-1, use_scale_shift_norm=True,
                  dropout=0.0)
    with torch.device("meta"):
        assert create_model(32, **common).channel_mult == (1, 2, 2, 2)
        assert create_model(64, **common).channel_mult == (1, 2, 3, 4)
        assert create_model(256, **common).channel_mult == (1, 1, 2, 2, 4, 4)
        m = create_model(16, **common, channel_mult=(1, 2), in_channels=1)
        assert m.out_channels == 2 and m.in_channels == 1 and m.attention_resolutions == (1, 2)
        assert m.num_heads_upsample == 1
        sr = sr_create_model(64, 16, **common)
        assert isinstance(sr, SuperResModel) and sr.in_channels == 6 and sr.channel_mult == (1, 2, 3, 4)
    with pytest.raises(ConfigError, match="--image_size 48.*channel_mult"):
        create_model(48, **common)
    with pytest.raises(ConfigError, match="divisible"):
        create_model(20, **common, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ConfigError, match="--attention_resolutions 12"):
        create_model(32, **{**common, "attention_resolutions": "12"})
    with pytest.raises(ConfigError, match="--small_size"):
        sr_create_model(64, 64, **common)


def test_attention_downsample_rates():
    assert attention_downsample_rates("16,8", 32, 4) == (2, 4)
    assert attention_downsample_rates([16, 8], 256, 6) == (16, 32)
    assert attention_downsample_rates("", 32, 4) == ()
    with pytest.raises(ConfigError):
        attention_downsample_rates("16,x", 32, 4)


def test_class_conditional_requires_labels():
    model = tiny(num_classes=5, use_scale_shift_norm=False, num_heads=1).eval()
    x, t = inputs()
    with torch.no_grad():
        a = model(x, t, y=torch.tensor([0, 1]))
        b = model(x, t, y=torch.tensor([2, 1]))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-6)
    with pytest.raises(ValueError, match="class labels"):
        model(x, t)
    with pytest.raises(ValueError, match="class labels"):
        tiny()(x, t, y=torch.tensor([0, 1]))


def test_attention_matches_explicit_qkv_maths():
    """SDPA path == the original's reshape-to-(B*heads, 3C/heads, L) attention, written out by hand."""
    from iddpm.models.attention import AttentionBlock

    torch.manual_seed(0)
    block = AttentionBlock(64, num_heads=4)
    torch.nn.init.normal_(block.proj_out.weight, std=0.1)
    x = torch.randn(2, 64, 4, 4)
    b, c, length = 2, 64, 16
    xf = x.reshape(b, c, length)
    qkv = torch.nn.functional.conv1d(block.norm(xf), block.qkv.weight, block.qkv.bias)
    qkv = qkv.reshape(b * 4, -1, length)
    ch = qkv.shape[1] // 3
    q, k, v = torch.split(qkv, ch, dim=1)
    scale = 1 / ch**0.25
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, length)
    ref = (xf + torch.nn.functional.conv1d(a, block.proj_out.weight, block.proj_out.bias)).reshape(x.shape)
    torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale_shift", [True, False])
def test_channels_last_same_output_and_layout(scale_shift):
    model = tiny(use_scale_shift_norm=scale_shift).eval()
    x, t = inputs()
    with torch.no_grad():
        ref = model(x, t)
        model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_same_grads():
    x, t = inputs()
    grads = []
    for use_ckpt in (False, True):
        model = tiny(use_checkpoint=use_ckpt, dropout=0.0).train()
        model(x, t).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


def test_dropout_active_only_in_training():
    model = tiny(dropout=0.5)
    x, t = inputs()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, t), model(x, t))
        model.train()
        assert not torch.equal(model(x, t), model(x, t))


@pytest.mark.parametrize("dims,shape", [(1, (2, 3, 16)), (3, (2, 3, 2, 8, 8))])
def test_other_dims(dims, shape):
    model = tiny(dims=dims, conv_resample=dims == 1).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        out = model(x, torch.tensor([1.0, 2.0]))
    assert out.shape == (shape[0], 6, *shape[2:])
    assert torch.isfinite(out).all()


def test_superres_concatenates_bilinear_upsample():
    torch.manual_seed(0)
    model = SuperResModel(3, 32, 3, 1, (2,), channel_mult=(1, 1), num_heads=1).eval()
    x, t = inputs(size=16)
    low = torch.randn(2, 3, 8, 8)
    up = torch.nn.functional.interpolate(low, (16, 16), mode="bilinear", align_corners=False)
    with torch.no_grad():
        out = model(x, t, low_res=low)
        ref = UNetModel.forward(model, torch.cat([x, up], dim=1), t)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="low_res"):
        model(x, t)


def test_state_dict_round_trip_strict():
    a = tiny()
    b = tiny(num_heads=1)  # heads do not change the layout
    b.load_state_dict(a.state_dict(), strict=True)
    with pytest.raises(RuntimeError):
        tiny(model_channels=64).load_state_dict(a.state_dict(), strict=True)


def test_bf16_autocast_and_fp16_torso():
    model = tiny(num_classes=3).eval()
    x, t = inputs()
    y = torch.tensor([0, 2])
    with torch.no_grad():
        ref = model(x, t, y=y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, y=y)
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), ref, atol=0.1, rtol=0.05)
        model.convert_to_fp16()
        assert model.inner_dtype == torch.float16 and model.time_embed[0].weight.dtype == torch.float32
        assert model.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32  # GroupNorm stays fp32
        half = model(x, t, y=y)
    assert half.dtype == torch.float32  # the head runs in the input's dtype, like the original
    torch.testing.assert_close(half, ref, atol=0.02, rtol=0.02)
    model.convert_to_fp32()
    assert model.inner_dtype == torch.float32


@pytest.mark.parametrize("scale_shift", [True, False])
def test_gradcheck_float64(scale_shift):
    """Backward through every block (incl. the in-place residual adds) equals finite differences."""
    model = tiny(use_scale_shift_norm=scale_shift, num_heads=1, channel_mult=(1, 1)).double().train()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([17.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda inp: model(inp, t), (x,), eps=1e-6, atol=1e-5)
