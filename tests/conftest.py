"""Shared test fixtures.

Parity tests read the original implementation's numbers from ``../shared/reference`` (beside the
repository; override with ``IDDPM_REFERENCE_DIR``).  They skip with a clear message when the
folder is absent (an end user's checkout); CI always has it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("IDDPM_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))


def pytest_configure(config):
    # Under pytest-xdist every worker gets one thread, so 2 workers do not oversubscribe 2 cores.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Folder of reference data from the original implementation (skips when absent)."""
    if not (REFERENCE_DIR / "README.md").is_file():
        pytest.skip(
            f"reference data not found at {REFERENCE_DIR}: parity tests need ../shared/reference beside the repo "
            "(or IDDPM_REFERENCE_DIR)"
        )
    return REFERENCE_DIR
