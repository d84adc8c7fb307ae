"""Shared pieces of ``benchmarks/gpu_check.py``: the check record, the small test U-Net, fp32 math modes,
and the in-process correctness checks (precision policy vs a float64 CPU reference, fp16 overflow).

Everything here runs on any device: on CUDA it verifies the GPU paths, on the CPU (``--smoke``) it runs the
same code on tiny inputs so that the script itself is tested without a GPU.  ``tests/cuda`` imports these
functions (with ``benchmarks/`` on ``sys.path``), so the script and the tests check the same things.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from iddpm.build import build_diffusion, build_model
from iddpm.config import RunConfig, apply_overrides
from iddpm.diffusion import create_named_schedule_sampler
from iddpm.models import optimize
from iddpm.runtime import DistContext
from iddpm.train.draws import example_draws, global_positions
from iddpm.train.schedule import lr_at
from iddpm.train.trainer import Trainer

# The small U-Net of every correctness check (and of the CLI runs, so that torch.compile's on-disk cache is
# shared between them): 16x16 RGB, 32 channels, attention at 8x8 with 2 heads, class-conditional, learned
# sigmas (hybrid loss: the vb term's float64 tables are exercised too), no dropout (deterministic steps).
SMALL = dict(image_size=16, in_channels=3, num_channels=32, num_res_blocks=1, channel_mult="1,2",
             attention_resolutions="8", num_heads=2, dropout=0.0, class_cond=True, num_classes=10,
             learn_sigma=True, noise_schedule="cosine", diffusion_steps=100, lr=1e-4, batch_size=8,
             ema_rate="0.99")
# --smoke (CPU) shrinks it further: CPU fp16 kernels are slow and the script's own test must stay short.
SMOKE = dict(image_size=8, attention_resolutions="4", batch_size=2)

# Tolerances of a few training steps against the float64 CPU reference.  loss: |loss - ref| / |ref| at every
# step; grad: ||g - g_ref|| / ||g_ref|| of the first step's whole gradient (all parameters as one vector);
# params: max |p - p_ref| after the last step in units of lr (AdamW moves each element by about lr per step
# whatever the gradient's size, so two runs drift apart by at most ~2 lr per step: a sanity bound that NaNs or a
# wrong update exceed).  Why these numbers:
#  fp32: IEEE float32 (eps 6e-8); summation order differs (cuDNN/cuBLAS vs CPU), errors grow ~sqrt(K) eps
#        per dot product of length K <= 600 and compound over ~20 layers: ~1e-6 on the loss and ~1e-5 on
#        gradients, 20x margin.
#  tf32: matmul/conv inputs rounded to a 10-bit mantissa (2^-11 = 4.9e-4 relative), fp32 accumulation and
#        fp32 outputs: a quarter of bf16's rounding or less, ~1e-4 on the loss, <~6e-3 on gradients.
#  bf16: autocast runs convs/linears/attention in bfloat16 (8-bit mantissa, 2^-9 = 2e-3) and stores their
#        outputs in bf16; GroupNorm and the diffusion maths stay float32: ~1e-2 on loss, several 1e-2 on grads.
#  fp16: 11-bit mantissa like TF32 but activations stored in fp16; the loss scale keeps gradients from
#        underflowing, so errors are a little above TF32's.
# Measured on a CPU (float32 / CPU bf16 / CPU fp16 autocast vs float64, 3 steps): fp32 loss 2e-7, grad 2e-6;
# bf16 loss 3e-4, grad 2.3e-2; fp16 loss 8e-5, grad 3e-3 -- 4-100x below these.
TOLERANCES = {
    "fp32": dict(loss=2e-5, grad=2e-4, params=2.5),
    "tf32": dict(loss=2e-3, grad=3e-2, params=6.0),
    "bf16": dict(loss=1e-2, grad=1e-1, params=6.0),
    "fp16": dict(loss=2e-3, grad=2e-2, params=6.0),
}


@dataclass
class Check:
    """One row of the report: ``status`` is pass, fail or skip; ``detail`` one line (measured vs tolerance)."""

    group: str
    name: str
    status: str
    detail: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def skipped(group: str, name: str, reason: str) -> Check:
    return Check(group, name, "skip", reason)


def verdict(group: str, name: str, ok: bool, detail: str, **values) -> Check:
    return Check(group, name, "pass" if ok else "fail", detail, values)


def run_check(group: str, name: str, fn: Callable[[], Check | list[Check]]) -> list[Check]:
    """Run ``fn`` and time it; an exception becomes a failed check whose detail is its first line."""
    t0 = time.perf_counter()
    try:
        out = fn()
        checks = out if isinstance(out, list) else [out]
    except Exception as exc:  # a crash is a finding, not the end of the run
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        checks = [Check(group, name, "fail", f"{type(exc).__name__}: {first}",
                        {"traceback": traceback.format_exc()[-4000:]})]
    if len(checks) == 1 and not checks[0].seconds:  # a group's rows were timed one by one inside it
        checks[0].seconds = time.perf_counter() - t0
    return checks


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


# ------------------------------------------------------------------------------------------------
# fp32 math mode: strict IEEE float32 or TF32 tensor cores for matmuls and convolutions
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def fp32_math(mode: str):
    """``mode`` "ieee" (true float32) or "tf32" for CUDA matmuls and cuDNN convolutions; restores the previous
    settings.  (PyTorch's default is TF32 for convolutions and IEEE for matmuls, so "fp32" is not IEEE unless
    asked.)  No effect on CPU computations.

    Uses the ``allow_tf32`` flags, not torch >= 2.9's ``fp32_precision`` properties: setting
    ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` leaves the legacy state behind, after which
    ``torch.get_float32_matmul_precision()`` and ``allow_tf32`` raise ("mix of the legacy and new APIs"),
    while the legacy setters keep both views consistent (checked on torch 2.13).  A flag that already has the
    wanted value is left alone: inductor's cache key holds the matmul setting, and leaving the default ("none",
    i.e. IEEE) in place lets the ``iddpm`` subprocesses reuse the graphs compiled here.
    """
    if mode not in ("ieee", "tf32"):
        raise ValueError(f"fp32_math({mode!r}): use 'ieee' or 'tf32'")
    want = mode == "tf32"
    flags = [m for m in (torch.backends.cuda.matmul, torch.backends.cudnn) if m.allow_tf32 != want]
    # the new-API view, to restore exactly (legacy "False" would come back as "ieee", not the default "none")
    views = [v for v in (torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None))
             if hasattr(v, "fp32_precision")]
    old_views = [v.fp32_precision for v in views]
    try:
        for m in flags:
            m.allow_tf32 = want
        yield
    finally:
        for m in flags:
            m.allow_tf32 = not want
        for v, old in zip(views, old_views):
            if v.fp32_precision != old:
                v.fp32_precision = old


# ------------------------------------------------------------------------------------------------
# the small model, its weights and one fixed batch
# ------------------------------------------------------------------------------------------------
def small_config(**overrides) -> RunConfig:
    """The :data:`SMALL` run config with flat ``overrides`` (any flag name, e.g. ``precision="bf16"``)."""
    return apply_overrides(RunConfig(), {**SMALL, **overrides}, source="gpu_check").validate()


def cli_flags(cfg_flags: dict[str, Any]) -> list[str]:
    """``{"image_size": 16, ...}`` -> ``["--image_size", "16", ...]`` for ``iddpm train``."""
    out: list[str] = []
    for k, v in cfg_flags.items():
        out += [f"--{k}", str(v)]
    return out


def init_state(cfg: RunConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 CPU state dict of ``cfg``'s model with its zero-initialised layers filled with N(0, 0.05^2), so that
    every parameter gets a gradient at the first step (a fresh U-Net's output conv is zero)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    sd = build_model(cfg).state_dict()
    return {k: torch.randn(v.shape, generator=g) * 0.05 if v.is_floating_point() and not v.any() else v
            for k, v in sd.items()}


def fixed_batch(cfg: RunConfig, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A CPU batch ``(x float32 [B, C, H, W] in [-1, 1], {"y": int64 [B]})`` of ``cfg.train.batch_size`` images."""
    m = cfg.model
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(cfg.train.batch_size, m.in_channels, m.image_size, m.image_size, generator=g) * 2 - 1
    cond = {"y": torch.randint(0, m.num_classes, (cfg.train.batch_size,), generator=g)} if m.class_cond else {}
    return x, cond


def make_trainer(cfg: RunConfig, state: dict, device, *, fast: bool = True) -> Trainer:
    """A :class:`Trainer` on ``device`` wired like ``iddpm train`` (model moved, then ``optimize``d, eager)."""
    device = torch.device(device)
    model = build_model(cfg)
    model.load_state_dict(state)
    model.to(device)
    module = optimize(model, "train", compile=False) if fast else model
    diffusion = build_diffusion(cfg.diffusion)
    sampler = create_named_schedule_sampler(cfg.train.schedule_sampler, diffusion)
    return Trainer(model=model, train_module=module, diffusion=diffusion, data=[], schedule_sampler=sampler,
                   dist=DistContext(device=device), cfg=cfg, progress=False)


def set_loss_scale(trainer: Trainer, scale: float) -> None:
    """Set the fp16 loss scale as a resumed checkpoint would (through the scaler's state dict)."""
    state = trainer.precision.scaler.state_dict()
    state["scale"] = float(scale)
    trainer.precision.scaler.load_state_dict(state)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])


# ------------------------------------------------------------------------------------------------
# training steps: the real Trainer on the device vs a float64 CPU reference of the same maths
# ------------------------------------------------------------------------------------------------
def reference_steps(cfg: RunConfig, state: dict, batch, steps: int) -> dict[str, Any]:
    """``steps`` optimizer steps of :meth:`Trainer.train_step` (one micro-batch, no clipping) in float64 on the
    CPU: the same per-example timesteps/noise (:func:`example_draws`), loss, lr schedule and AdamW."""
    tc = cfg.train
    model = build_model(cfg).double()
    model.load_state_dict(state)
    diffusion = build_diffusion(cfg.diffusion)
    sampler = create_named_schedule_sampler(tc.schedule_sampler, diffusion)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    x, cond = batch
    x = x.double()
    n = x.shape[0]
    losses_out, grad1 = [], None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc.lr, tc.lr_anneal_steps, tc.warmup_steps)
        t, w, noise = example_draws(sampler, tc.seed, step, global_positions(n, 0, 1), x.shape[1:], torch.device("cpu"))
        losses = diffusion.training_losses(model, x, t, model_kwargs=dict(cond), noise=noise.double())
        loss = (losses["loss"] * w.double()).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad1 is None:
            grad1 = flat(p.grad for p in model.parameters())
        opt.step()
        losses_out.append(float(loss.detach()))
    return {"losses": losses_out, "grad1": grad1, "params": flat(model.parameters())}


def device_steps(cfg: RunConfig, state: dict, batch, steps: int, device, loss_scale: float | None = None):
    """The same steps with the real :class:`Trainer` (precision policy of ``cfg``) on ``device``."""
    trainer = make_trainer(cfg, state, device)
    if loss_scale is not None and trainer.precision.scaling:
        set_loss_scale(trainer, loss_scale)
    losses, grad1, stepped = [], None, []
    for _ in range(steps):
        out = trainer.train_step(*batch)
        losses.append(out["loss"])
        stepped.append(out["stepped"])
        if grad1 is None:
            grad1 = flat(p.grad for p in trainer.model.parameters())
    synchronize(device)
    return {"losses": losses, "grad1": grad1, "params": flat(trainer.model.parameters()), "stepped": stepped}


def compare_steps(mode: str, got: dict, ref: dict, lr: float, steps: int) -> Check:
    """A verdict on :func:`device_steps` vs :func:`reference_steps` against :data:`TOLERANCES` [mode]."""
    tol = TOLERANCES[mode]
    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"]))
    grad_rel = float((got["grad1"] - ref["grad1"]).norm() / ref["grad1"].norm())
    param_lr = float((got["params"] - ref["params"]).abs().max()) / (lr * steps)
    finite = all(map(torch.isfinite, (got["grad1"].sum(), got["params"].sum())))
    ok = finite and all(got["stepped"]) and loss_rel <= tol["loss"] and grad_rel <= tol["grad"] \
        and param_lr <= tol["params"]
    detail = (f"loss rel {loss_rel:.1e} (tol {tol['loss']:.0e}), grad rel {grad_rel:.1e} (tol {tol['grad']:.0e}), "
              f"params {param_lr:.2f} lr/step (tol {tol['params']})")
    if not all(got["stepped"]):
        detail += f"; unexpected skipped steps {got['stepped']}"
    return verdict("precision", f"train {mode} vs fp64", ok, detail, loss_rel=loss_rel, grad_rel=grad_rel,
                   param_lr_per_step=param_lr, losses=got["losses"], ref_losses=ref["losses"])


def precision_checks(device, modes=("fp32", "tf32", "bf16", "fp16"), steps: int = 3,
                     small: dict | None = None) -> list[Check]:
    """Each precision mode's first ``steps`` Trainer steps on ``device`` vs one float64 CPU reference
    (``small``: overrides of the :data:`SMALL` config, e.g. :data:`SMOKE`)."""
    small = small or {}
    base = small_config(**small)
    state, batch = init_state(base), fixed_batch(base)
    ref = reference_steps(base, state, batch, steps)
    out = []
    for mode in modes:
        name = f"train {mode} vs fp64"
        if mode == "tf32" and not is_cuda(device):
            out.append(skipped("precision", name, "skipped: no CUDA (TF32 is a CUDA tensor-core mode)"))
            continue
        if mode == "bf16" and is_cuda(device) and not torch.cuda.is_bf16_supported():
            out.append(skipped("precision", name, "skipped: this GPU has no bfloat16"))
            continue
        cfg = small_config(**small, precision="fp32" if mode == "tf32" else mode)

        def one(cfg=cfg, mode=mode):
            with fp32_math("tf32" if mode == "tf32" else "ieee"):
                # fp16: start from a resumed-like scale of 2^16 (the default 2^20 overflows the first steps,
                # which is right but would skip the steps compared here; the overflow has its own check)
                got = device_steps(cfg, state, batch, steps, device, loss_scale=2.0**16)
            return compare_steps(mode, got, ref, cfg.train.lr, steps)

        out += run_check("precision", name, one)
    return out


def fp16_overflow_check(device, small: dict | None = None) -> Check:
    """A step whose scaled loss overflows fp16 must be skipped (weights, optimizer and EMA untouched), halve the
    scale and be logged (``skipped_steps`` / ``lg_loss_scale`` metrics); the next step at a sane scale updates."""
    cfg = small_config(**(small or {}), precision="fp16")
    trainer = make_trainer(cfg, init_state(cfg), device)
    batch = fixed_batch(cfg)
    set_loss_scale(trainer, 2.0**60)  # 2^60 * loss: the fp16 gradients of the output are inf
    before = flat(trainer.model.parameters())
    ema_before = flat(trainer.ema.shadows[0])
    with fp32_math("ieee"):
        first = trainer.train_step(*batch)
        logged = trainer.meter.means()
        scale_after = trainer.precision.loss_scale()
        unchanged = torch.equal(flat(trainer.model.parameters()), before) and \
            torch.equal(flat(trainer.ema.shadows[0]), ema_before) and not trainer.optimizer.state
        set_loss_scale(trainer, 2.0**16)
        second = trainer.train_step(*batch)
    moved = not torch.equal(flat(trainer.model.parameters()), before)
    ok = (not first["stepped"]) and unchanged and scale_after == 2.0**59 and logged.get("skipped_steps") == 1.0 \
        and logged.get("lg_loss_scale") == 59.0 and second["stepped"] and moved and trainer.step == 2
    detail = (f"forced overflow at scale 2^60: stepped={first['stepped']}, weights/EMA/optimizer untouched="
              f"{unchanged}, "
              f"scale -> 2^{math.log2(scale_after):.0f}, logged skipped_steps="
              f"{logged.get('skipped_steps')} lg_loss_scale={logged.get('lg_loss_scale')}; next step at 2^16 "
              f"stepped={second['stepped']}")
    return verdict("precision", "fp16 overflow skipped + logged", ok, detail)
