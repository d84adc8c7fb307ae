"""Kernel-level checks of ``benchmarks/gpu_check.py``: ``torch.compile`` of the fast path (no graph break, no
recompile, same numbers as eager) and the fused SDPA attention backends vs the math backend.

``compile_check`` uses inductor on CUDA; ``--smoke`` runs it with the ``aot_eager`` backend on the CPU, which
traces the same graphs (dynamo + AOTAutograd: graph breaks and functionalisation problems show up) without
needing a C++ compiler.
"""

from __future__ import annotations

import math

import torch
from gpu_check_lib import Check, fixed_batch, fp32_math, init_state, is_cuda, run_check, skipped, small_config, verdict
from torch.nn.attention import SDPBackend, sdpa_kernel

from iddpm.build import build_model
from iddpm.config import preset
from iddpm.models import optimize
from iddpm.models.attention import AttentionBlock, qkv_attention

# torch.compile vs eager, relative L2 error of the output and of the whole gradient, IEEE fp32 on both sides:
# inductor fuses elementwise chains and reorders GroupNorm reductions but keeps float32 everywhere, and calls
# the same cuDNN convolutions, so per-op differences are ~1e-6 and compound to ~1e-5 over the network (10x
# margin).  Under bf16 autocast both sides round to bf16 at different points (inductor keeps fused
# intermediates in fp32), so they may differ by bf16 rounding (2^-9 = 2e-3 per op, ~1e-2 over the network).
COMPILE_TOL = {"fp32": dict(out=1e-4, grad=1e-3), "bf16": dict(out=3e-2, grad=1e-1)}

# Fused SDPA vs a float64 math-backend reference on the same (rounded) inputs: max |error| / max |ref| of the
# attention output and of the packed qkv gradient.  Flash and memory-efficient kernels use online softmax
# with fp32 accumulators but round the probabilities to the input dtype before the PV product: errors of a
# few ulps of that dtype (bf16 ulp 2^-8 relative, fp16 2^-11); fp32 (memory-efficient only) ~1e-6.
SDPA_TOL = {torch.bfloat16: dict(out=2e-2, grad=5e-2), torch.float16: dict(out=3e-3, grad=1e-2),
            torch.float32: dict(out=1e-5, grad=1e-4)}
SDPA_PRESETS = ("cifar10_uncond", "imagenet64_cond")  # their attention shapes (head dims 64, 144, 192)
SDPA_DTYPES = {SDPBackend.FLASH_ATTENTION: (torch.bfloat16, torch.float16),
               SDPBackend.EFFICIENT_ATTENTION: (torch.float32, torch.bfloat16, torch.float16),
               SDPBackend.CUDNN_ATTENTION: (torch.bfloat16, torch.float16)}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------
def _pair(cfg, device, mode: str, backend: str):
    """(eager fast-path module, compiled fast-path module) with the same weights, in ``mode``'s train/eval state."""
    state = init_state(cfg)
    out = []
    for compiled in (False, True):
        model = build_model(cfg)
        model.load_state_dict(state)
        model.to(device).train(mode == "train")
        kwargs = {"fullgraph": True, "backend": backend} if compiled else None
        out.append(optimize(model, mode, compile=compiled, compile_kwargs=kwargs))
    return out


def _inputs(cfg, device, shift: float = 0.0):
    x, cond = fixed_batch(cfg)
    n = x.shape[0]
    t = torch.linspace(0.0, 999.0, n) * (1 - shift) + shift * 500.0  # rescaled timesteps, as the model sees them
    return x.to(device), t.to(device), {k: v.to(device) for k, v in cond.items()}


def _run(module, x, t, kw, train: bool, autocast_dtype):
    device_type = x.device.type
    ctx = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else torch.autocast(device_type,
                                                                                                   enabled=False)
    if not train:
        with torch.no_grad(), ctx:
            return module(x, t, **kw).float(), None
    with ctx:
        out = module(x, t, **kw).float()
    w = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)  # a fixed, dense cotangent
    (out * w).sum().backward()
    grads = torch.cat([p.grad.reshape(-1) for p in module.parameters()])
    module.zero_grad(set_to_none=True)
    return out.detach(), grads


def compile_check(device, mode: str, backend: str = "inductor", precision: str = "fp32",
                  small: dict | None = None) -> Check:
    """``optimize(model, mode, compile=True)`` with ``fullgraph=True`` (a graph break raises) vs the eager fast
    path: outputs (and for ``train`` the parameter gradients) within :data:`COMPILE_TOL`; two more calls with other
    timestep values must not recompile (``error_on_recompile``)."""
    cfg = small_config(**(small or {}))
    eager, compiled = _pair(cfg, device, mode, backend)
    dtype = torch.bfloat16 if precision == "bf16" else None
    train = mode == "train"
    with fp32_math("ieee"):
        x, t, kw = _inputs(cfg, device)
        out_e, g_e = _run(eager, x, t, kw, train, dtype)
        out_c, g_c = _run(compiled, x, t, kw, train, dtype)
        with torch._dynamo.config.patch(error_on_recompile=True):  # sampling calls it once per step: no recompiles
            for shift in (0.25, 0.5):
                _run(compiled, *_inputs(cfg, device, shift), train, dtype)
    tol = COMPILE_TOL[precision]
    out_err = rel_l2(out_c, out_e)
    grad_err = rel_l2(g_c, g_e) if train else 0.0
    ok = out_err <= tol["out"] and grad_err <= tol["grad"] and bool(torch.isfinite(out_c).all())
    detail = f"fullgraph, no recompile; output rel {out_err:.1e} (tol {tol['out']:.0e})"
    if train:
        detail += f", grads rel {grad_err:.1e} (tol {tol['grad']:.0e})"
    return verdict("compile", f"compile {mode} {precision} ({backend})", ok, detail, out_rel=out_err, grad_rel=grad_err)


def compile_checks(device, backend: str, small: dict | None = None, with_bf16: bool = True) -> list[Check]:
    """:func:`compile_check` for training and sampling in fp32 and (``with_bf16``) training under bf16 autocast."""
    out = []
    for mode, precision in (("train", "fp32"), ("sample", "fp32"), ("train", "bf16")):
        if precision == "bf16" and not with_bf16:
            out.append(skipped("compile", f"compile {mode} {precision}", "skipped: --smoke"))
            continue
        if precision == "bf16" and is_cuda(device) and not torch.cuda.is_bf16_supported():
            out.append(skipped("compile", f"compile {mode} {precision}", "skipped: this GPU has no bfloat16"))
            continue
        torch._dynamo.reset()  # each check compiles from scratch (recompile limits, clean error_on_recompile)
        out += run_check("compile", f"compile {mode} {precision} ({backend})",
                         lambda m=mode, p=precision: compile_check(device, m, backend, p, small))
    torch._dynamo.reset()
    return out


# ------------------------------------------------------------------------------------------------
# SDPA backends
# ------------------------------------------------------------------------------------------------
def attention_shapes(presets=SDPA_PRESETS) -> list[tuple[str, int, int, int]]:
    """``(preset, C, L, heads)`` of every distinct attention layer of the presets (from a forward on the meta
    device, so no memory or time is spent)."""
    shapes: list[tuple[str, int, int, int]] = []
    for name in presets:
        cfg = preset(name)
        m = cfg.model
        seen: set[tuple[int, int, int]] = set()
        with torch.device("meta"):
            model = build_model(cfg)

            def hook(module, args, seen=seen):
                x = args[0]
                seen.add((int(x.shape[1]), math.prod(x.shape[2:]), module.num_heads))

            for module in model.modules():
                if isinstance(module, AttentionBlock):
                    module.register_forward_pre_hook(hook)
            kw = {"y": torch.zeros(1, dtype=torch.long)} if m.class_cond else {}
            model(torch.zeros(1, m.in_channels, m.image_size, m.image_size), torch.zeros(1), **kw)
        shapes += [(name, *s) for s in sorted(seen)]
    return shapes


def _attention(qkv: torch.Tensor, heads: int, backend, gout: torch.Tensor):
    """Output and qkv gradient of the library's ``qkv_attention`` restricted to ``backend``."""
    qkv = qkv.detach().requires_grad_(True)
    with sdpa_kernel([backend]):
        out = qkv_attention(qkv, heads)
        out.backward(gout.to(out.dtype))
    return out.detach(), qkv.grad


def sdpa_check(device, backend, dtype, shapes, batch: int = 2) -> Check:
    """``backend`` vs the math backend in float64 on the same inputs, for every shape in ``shapes``."""
    name = f"sdpa {backend.name.lower()} {str(dtype).replace('torch.', '')}"
    tol = SDPA_TOL[dtype]
    worst = {"out": 0.0, "grad": 0.0, "math_out": 0.0}
    done, missing = [], []
    g = torch.Generator().manual_seed(0)
    for preset_name, c, length, heads in shapes:
        qkv = torch.randn(batch, length, 3 * c, generator=g).to(device=device, dtype=dtype)
        gout = torch.randn(batch, length, c, generator=g).to(device)
        try:
            out, grad = _attention(qkv, heads, backend, gout)
        except RuntimeError as exc:
            # cuDNN attention is not iddpm's default path (PyTorch prefers flash / memory-efficient for these
            # shapes), so any refusal of it is reported, not failed
            if "No available kernel" not in str(exc) and backend is not SDPBackend.CUDNN_ATTENTION:
                raise
            missing.append(f"{preset_name} C={c} L={length} d={c // heads}")
            continue
        ref_out, ref_grad = _attention(qkv.double(), heads, SDPBackend.MATH, gout.double())
        math_out, _ = _attention(qkv, heads, SDPBackend.MATH, gout)
        worst["out"] = max(worst["out"], rel_max(out, ref_out))
        worst["grad"] = max(worst["grad"], rel_max(grad, ref_grad))
        worst["math_out"] = max(worst["math_out"], rel_max(math_out, ref_out))
        done.append(f"{preset_name} d={c // heads} L={length}")
    note = f"; no kernel for {', '.join(missing)}" if missing else ""
    if not done:
        return Check("sdpa", name, "skip", f"skipped: no {backend.name} kernel here{note}")
    ok = worst["out"] <= tol["out"] and worst["grad"] <= tol["grad"]
    detail = (f"{len(done)} shapes: out {worst['out']:.1e} (tol {tol['out']:.0e}; math backend in this dtype "
              f"{worst['math_out']:.1e}), grad {worst['grad']:.1e} (tol {tol['grad']:.0e}){note}")
    return verdict("sdpa", name, ok, detail, shapes=done, no_kernel=missing, **worst)


def sdpa_checks(device, presets=SDPA_PRESETS) -> list[Check]:
    shapes = attention_shapes(presets)
    out = []
    for backend, dtypes in SDPA_DTYPES.items():
        for dtype in dtypes:
            if not is_cuda(device) and backend is not SDPBackend.FLASH_ATTENTION:
                out.append(skipped("sdpa", f"sdpa {backend.name.lower()} {str(dtype).replace('torch.', '')}",
                                   "skipped: no CUDA (no CPU kernel)"))
                continue
            if dtype is torch.bfloat16 and is_cuda(device) and not torch.cuda.is_bf16_supported():
                continue
            out += run_check("sdpa", f"sdpa {backend.name.lower()} {dtype}",
                             lambda b=backend, d=dtype: sdpa_check(device, b, d, shapes))
    return out
