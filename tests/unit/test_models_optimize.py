"""optimize(): channels_last fast path (and torch.compile) gives the eager model's numbers."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import tiny_unet

from iddpm.models import OptimizedUNet, SuperResModel, UNetModel, optimize


def tiny(**kw) -> UNetModel:
    return tiny_unet(**{"num_classes": 4, **kw})


def batch(size=8):
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, size, size, generator=g), torch.tensor([10.0, 3000.5]), torch.tensor([1, 3])


@pytest.mark.parametrize("mode", ["train", "sample"])
def test_optimize_same_outputs_and_state_dict(mode):
    model = tiny().eval()
    x, t, y = batch()
    with torch.no_grad():
        ref = model(x, t, y=y)
    keys = list(model.state_dict())
    fast = optimize(model, mode, compile=False)
    assert isinstance(fast, OptimizedUNet) and not fast.compiled
    # parameters converted in place, keys unchanged, wrapper state_dict has no prefix
    assert model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert list(fast.state_dict()) == keys
    assert {id(p) for p in fast.parameters()} == {id(p) for p in model.parameters()}
    assert fast.num_classes == 4 and fast.model_channels == 32
    with torch.no_grad():
        out = fast(x, t, y=y)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert optimize(fast, mode, compile=False).model is model  # idempotent
    fast.load_state_dict(model.state_dict())


def test_optimize_train_gradients_match_eager():
    x, t, y = batch()
    grads = []
    for fast in (False, True):
        model = tiny().train()
        net = optimize(model, "train", compile=False) if fast else model
        net(x, t, y=y).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4, msg=n)


def test_optimize_superres_low_res():
    torch.manual_seed(0)
    model = SuperResModel(3, 32, 6, 1, (2,), channel_mult=(1, 1), num_heads=2, use_scale_shift_norm=True).eval()
    x, t, _ = batch(16)
    low = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x, t, low_res=low)
        out = optimize(model, "sample", compile=False)(x, t, low_res=low)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_optimize_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        optimize(tiny(), "fast")


def test_optimize_default_does_not_compile_on_cpu():
    assert not optimize(tiny(), "sample").compiled


def _skip_without_compile(need_cxx: bool) -> None:
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available in this PyTorch build")
    from torch import _dynamo

    if not _dynamo.is_dynamo_supported():
        pytest.skip("torch.compile (dynamo) is not supported on this Python/platform")
    if need_cxx and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("torch.compile's inductor backend on CPU needs a C++ compiler (none found on PATH)")


def _check_compiled(compile_kwargs):
    model = UNetModel(3, 32, 3, 1, (1,), channel_mult=(1,), num_heads=1).eval()
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([1.0, 7.0])
    with torch.no_grad():
        ref = model(x, t)
        fast = optimize(model, "sample", compile=True, compile_kwargs=compile_kwargs)
        assert fast.compiled
        out = fast(x, t)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_compile_traces_tiny_model():
    """Dynamo captures the whole forward (SDPA, GroupNorm, in-place SiLU) -- fast, no C++ build."""
    _skip_without_compile(need_cxx=False)
    _check_compiled({"backend": "aot_eager", "fullgraph": True})


@pytest.mark.slow
def test_compile_tiny_model_inductor():
    """The default inductor backend (C++ code generation on CPU: ~40 s cold, seconds once cached)."""
    _skip_without_compile(need_cxx=True)
    _check_compiled(None)


def test_fast_dropout_distribution_scale_and_gradient():
    from iddpm.models.layers import dropout

    x = torch.rand(64, 32, 16, 16).add_(0.5).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.manual_seed(1)
    out = dropout(x, 0.1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    kept = out != 0
    # 524288 draws: the keep rate is 0.9 within 5 standard deviations (0.0021)
    assert abs(kept.float().mean().item() - 0.9) < 0.0021
    torch.testing.assert_close(out[kept], x[kept] / 0.9)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(gx, g * kept / 0.9)
    torch.manual_seed(1)
    assert torch.equal(dropout(x, 0.1), out)  # the global generator drives it
    assert dropout(x, 0.0) is x
    assert (dropout(x, 1.0) == 0).all()


def test_optimize_sets_fast_dropout_only_on_the_optimized_model():
    from iddpm.models.blocks import ResBlock

    model = tiny(dropout=0.3).train()
    other = tiny(dropout=0.3).train()
    optimize(model, "train", compile=False)
    assert all(m.fast for m in model.modules() if isinstance(m, ResBlock))
    assert not any(m.fast for m in other.modules() if isinstance(m, ResBlock))
    x, t, y = batch()
    torch.manual_seed(0)
    a = model(x, t, y=y)
    torch.manual_seed(0)
    b = model(x, t, y=y)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # seeded: reproducible
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y=y), other.eval()(x, t, y=y), atol=1e-5, rtol=1e-4)


def test_fast_dropout_with_gradient_checkpointing_replays_the_mask():
    x, t, y = batch()
    grads = []
    for ckpt in (False, True):
        model = tiny(dropout=0.3, use_checkpoint=ckpt).train()
        net = optimize(model, "train", compile=False)
        torch.manual_seed(5)
        net(x, t, y=y).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4, msg=n)


_ALLOCATOR_PROBE = r"""
import ctypes, json
from iddpm.models import tune_cpu_allocator

libc = ctypes.CDLL("libc.so.6")
field = ctypes.c_size_t if hasattr(libc, "mallinfo2") else ctypes.c_int  # mallinfo2 from glibc 2.33
class MallInfo(ctypes.Structure):
    _fields_ = [(n, field) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                     "uordblks", "fordblks", "keepcost")]
mallinfo = getattr(libc, "mallinfo2", None) or libc.mallinfo
mallinfo.restype = MallInfo
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
SIZE = 64 << 20  # above glibc's largest dynamic mmap threshold (32 MiB)

def probe():
    before = mallinfo()
    block = libc.malloc(SIZE)
    during = mallinfo()
    libc.free(block)
    after = mallinfo()
    on_heap, not_trimmed = during.uordblks - before.uordblks >= SIZE, after.arena >= during.arena
    return {"mmapped": during.hblkhd - before.hblkhd >= SIZE, "heap_kept_after_free": on_heap and not_trimmed}

out = {"untuned": probe(), "first": tune_cpu_allocator()}
out["tuned"] = probe()
out["second"] = tune_cpu_allocator()
out["tuned_twice"] = probe()
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tune_cpu_allocator_keeps_large_blocks_on_the_heap_and_is_idempotent():
    """In a fresh process (the tuning is process-wide and cannot be undone, and this worker's allocator is already
    tuned by earlier optimize() calls): a 64 MiB block is mmapped and returned to the OS on free before tuning,
    taken from the heap and kept after it; a second call reports the same and changes nothing."""
    run = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["untuned"] == {"mmapped": True, "heap_kept_after_free": False}
    assert out["first"] is True and out["second"] is True
    assert out["tuned"] == out["tuned_twice"] == {"mmapped": False, "heap_kept_after_free": True}


def test_compile_traces_training_forward_with_dropout_in_one_graph():
    """Training mode (dropout on, autograd on) has no graph break either (fullgraph=True would raise)."""
    _skip_without_compile(need_cxx=False)
    model = tiny(dropout=0.1).train()
    fast = optimize(model, "train", compile=True, compile_kwargs={"backend": "aot_eager", "fullgraph": True})
    x, t, y = batch()
    out = fast(x, t, y=y)
    out.square().mean().backward()
    assert model.input_blocks[0][0].weight.grad is not None
