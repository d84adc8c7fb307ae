"""iddpm's CUDA paths, as the checks of ``benchmarks/gpu_check.py`` (the same functions, one test per check).

Marked ``cuda`` and skipped without a GPU.  Tolerances and their reasons live beside the checks in
``benchmarks/gpu_check_lib.py`` / ``gpu_check_kernels.py``.  ``python benchmarks/gpu_check.py --smoke`` runs the
same code on the CPU (tests/unit/test_gpu_check_script.py).
"""

from __future__ import annotations

import gpu_check_kernels as kernels
import gpu_check_lib as lib
import gpu_check_runs as runs
import pytest
import torch

NO_GPU = "no CUDA GPU (benchmarks/gpu_check.py --smoke runs these checks' code on the CPU)"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)]

DEVICE = "cuda"


def assert_passed(checks: list[lib.Check]) -> None:
    """No check failed (a failure shows its detail and traceback) and at least one really ran."""
    for c in checks:
        assert c.status != "fail", f"{c.name}: {c.detail}\n{c.values.get('traceback', '')}"
    if all(c.status == "skip" for c in checks):
        pytest.skip("; ".join(c.detail for c in checks))


@pytest.mark.parametrize("mode", ["fp32", "tf32", "bf16", "fp16"])
def test_trainer_steps_match_fp64_reference(mode):
    assert_passed(lib.precision_checks(DEVICE, modes=(mode,)))


def test_fp16_overflow_is_skipped_and_logged():
    assert_passed([lib.fp16_overflow_check(DEVICE)])


@pytest.mark.parametrize("mode,precision", [("train", "fp32"), ("sample", "fp32"), ("train", "bf16")])
def test_compile_fullgraph_matches_eager(mode, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    torch._dynamo.reset()
    try:
        assert_passed([kernels.compile_check(DEVICE, mode, "inductor", precision)])
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("backend,dtype", [(b, d) for b, ds in kernels.SDPA_DTYPES.items() for d in ds],
                         ids=lambda v: getattr(v, "name", str(v).replace("torch.", "")).lower())
def test_sdpa_backend_matches_math(backend, dtype):
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    assert_passed([kernels.sdpa_check(DEVICE, backend, dtype, kernels.attention_shapes())])


def test_same_seed_same_images_for_two_batch_sizes():
    assert_passed([runs.batch_invariance_check(DEVICE)])


def test_torchrun_train_and_sample(tmp_path):
    precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert_passed([runs.torchrun_train_check(DEVICE, tmp_path, {}, precision)])
    assert_passed([runs.torchrun_sample_check(DEVICE, tmp_path)])


def test_nccl_probe(tmp_path):
    assert_passed([runs.nccl_probe_check(DEVICE, tmp_path)])


def test_exact_resume_deterministic(tmp_path):
    assert_passed([runs.resume_check(DEVICE, tmp_path, {}, "fp16")])
