"""tests/conftest.py sets torch's process-wide settings back after every test (see helpers.torch_process_settings)."""

from __future__ import annotations

import pytest
import torch
from helpers import restore_torch_process_settings, torch_process_settings


def _change_everything():
    """Changes every restorable setting away from its usual value (not the inter-op thread count: torch lets a
    process set that once only)."""
    torch.set_num_threads(torch.get_num_threads() + 1)
    torch.set_default_dtype(torch.float64)
    torch.set_default_device("meta")
    torch.set_grad_enabled(False)
    torch.set_anomaly_enabled(True, check_nan=False)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_flush_denormal(True)
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.benchmark = True
    torch.backends.mkldnn.enabled = False


def test_restore_sets_every_changed_setting_back():
    before = torch_process_settings()
    try:
        _change_everything()
        changed = torch_process_settings()
    finally:
        restored = restore_torch_process_settings(before)
    assert torch_process_settings() == before
    expected = {"num_threads", "default_dtype", "default_device", "grad_enabled", "anomaly", "deterministic_algorithms",
                "flush_denormal", "float32_matmul_precision", "backends.cudnn.benchmark", "backends.mkldnn.enabled"}
    assert expected <= {k for k in before if changed[k] != before[k]}  # the snapshot sees each change
    assert expected <= set(restored)
    assert restore_torch_process_settings(before) == []  # nothing left to restore
    assert (torch.tensor([1e-39]) * 2).item() != 0  # denormals are kept again, tensors are float32 on the CPU


def test_restore_names_a_setting_it_cannot_set_back(monkeypatch):
    saved = torch_process_settings()
    saved["num_interop_threads"] += 1

    def refuse(n):
        raise RuntimeError("cannot set number of interop threads after parallel work has started")

    monkeypatch.setattr(torch, "set_num_interop_threads", refuse)
    with pytest.raises(RuntimeError, match="num_interop_threads"):
        restore_torch_process_settings(saved)


def test_the_restoring_fixture_runs_around_every_test(request):
    assert "_restore_torch_settings" in request.fixturenames  # autouse, from tests/conftest.py


# The pair below runs in file order; under pytest-xdist the two may land in different workers, where the second
# still holds (each worker starts from the baseline) -- the direct test above covers the mechanism either way.
def test_a_test_that_leaks_process_wide_settings():
    torch.set_num_threads(torch.get_num_threads() + 1)
    torch.set_default_dtype(torch.float64)
    torch.set_flush_denormal(True)
    torch.use_deterministic_algorithms(True, warn_only=True)


def test_the_next_test_sees_the_session_settings(torch_settings_baseline):
    assert torch_process_settings() == torch_settings_baseline
    assert torch.get_default_dtype() == torch.float32 and not torch.are_deterministic_algorithms_enabled()
