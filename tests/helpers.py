"""Helpers shared by several test files (importable because pytest puts ``tests/`` on sys.path for conftest.py)."""

from __future__ import annotations

import numpy as np
import torch


def assert_same_images(a, b):
    """Equal up to the network's float32 round-off across batch shapes (~1e-6): at most +-1 on < 1% of values."""
    d = np.abs(a.astype(np.int64) - b.astype(np.int64))
    assert d.max() <= 1 and (d > 0).mean() < 0.01, (d.max(), (d > 0).mean())


def random_weights(cfg, seed: int = 0) -> dict:
    """A tiny model's state_dict whose zero-initialised layers (output convs) are filled with small random
    values, so that outputs depend on the inputs (x, t, y, low_res)."""
    from iddpm.build import build_model

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    sd = build_model(cfg).state_dict()
    return {k: torch.randn(v.shape, generator=g) * 0.1 if v.is_floating_point() and not v.any() else v
            for k, v in sd.items()}
