"""Training: the :class:`Trainer` loop, EMA, precision policy, lr schedule; :func:`train` wires a run from a config."""

from iddpm.train.ema import EMA
from iddpm.train.precision import Precision
from iddpm.train.schedule import lr_at
from iddpm.train.trainer import NonFiniteLossError, Trainer, TrainResult

__all__ = ["EMA", "Precision", "lr_at", "Trainer", "TrainResult", "NonFiniteLossError"]
