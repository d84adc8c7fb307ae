"""Shared test fixtures.

Parity tests read the original implementation's numbers from ``../shared/reference`` (beside the
repository; override with ``IDDPM_REFERENCE_DIR``).  They skip with a clear message when the
folder is absent (an end user's checkout); CI always has it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import REFERENCE_DIR, restore_torch_process_settings, torch_process_settings


def pytest_configure(config):
    # Under pytest-xdist every worker gets one thread, so 2 workers do not oversubscribe 2 cores.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def torch_settings_baseline() -> dict:
    """torch's process-wide settings as the session starts (after the worker's thread choice above)."""
    return torch_process_settings()


@pytest.fixture(autouse=True)
def _restore_torch_settings(torch_settings_baseline):
    """After every test, torch's process-wide settings (threads, default dtype/device, grad mode, determinism,
    denormals, matmul precision, backend flags) are set back to the session's: in-process ``main([...])`` calls
    (e.g. ``iddpm demo --threads``) must not change the kernels, hence the float32 round-off, of later tests in
    the same worker.  The baseline, not the value before the test, is restored, so that a change made by a
    module-scoped fixture (set up before this fixture) ends with the first test that used it."""
    yield
    restore_torch_process_settings(torch_settings_baseline)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Folder of reference data from the original implementation (skips when absent)."""
    if not (REFERENCE_DIR / "README.md").is_file():
        pytest.skip(
            f"reference data not found at {REFERENCE_DIR}: parity tests need ../shared/reference beside the repo "
            "(or IDDPM_REFERENCE_DIR)"
        )
    return REFERENCE_DIR
