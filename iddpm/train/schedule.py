"""Learning-rate schedule: optional linear warmup, then the original's linear anneal to 0."""

from __future__ import annotations


def lr_at(step: int, base_lr: float, anneal_steps: int = 0, warmup_steps: int = 0) -> float:
    """Learning rate of the optimizer update made at (0-based) ``step``.

    Anneal as the original's ``TrainLoop._anneal_lr``: ``lr * (1 - step / anneal_steps)``
    (0 anneal steps = constant).  Warmup multiplies by ``(step + 1) / warmup_steps`` for the
    first ``warmup_steps`` updates (0 = no warmup).
    """
    lr = base_lr
    if anneal_steps:
        lr *= max(0.0, 1.0 - step / anneal_steps)
    if warmup_steps and step < warmup_steps:
        lr *= (step + 1) / warmup_steps
    return lr
