"""The three switches of a Gaussian diffusion, with the original's names and ``enum.auto()`` values."""

from __future__ import annotations

import enum

__all__ = ["ModelMeanType", "ModelVarType", "LossType", "coerce_enum"]


class ModelMeanType(enum.Enum):
    """What the model's first C output channels predict."""

    PREVIOUS_X = enum.auto()  # the mean of x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise eps


class ModelVarType(enum.Enum):
    """How the reverse-process variance is obtained.

    LEARNED and LEARNED_RANGE need a model with 2C output channels (the second half gives the variance).
    """

    LEARNED = enum.auto()  # second half = log-variance
    FIXED_SMALL = enum.auto()  # posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # beta_t (posterior variance at t = 0)
    LEARNED_RANGE = enum.auto()  # second half v in [-1, 1] interpolates log beta~_t .. log beta_t


class LossType(enum.Enum):
    """Training objective."""

    MSE = enum.auto()  # plain MSE (+ unscaled vb term when the variance is learned)
    RESCALED_MSE = enum.auto()  # MSE + vb * T/1000 (the paper's hybrid loss, lambda = 0.001)
    KL = enum.auto()  # the variational bound term
    RESCALED_KL = enum.auto()  # KL * T, to estimate the full bound

    def is_vb(self) -> bool:
        """True for the variational-bound losses (KL, RESCALED_KL)."""
        return self in (LossType.KL, LossType.RESCALED_KL)


def coerce_enum(value, enum_cls: type[enum.Enum], arg: str) -> enum.Enum:
    """``value`` as a member of ``enum_cls``: accepts a member, its name (any case) or its int value.

    Raises ValueError naming ``arg`` and the valid choices for anything else.
    """
    if isinstance(value, enum_cls):
        return value
    choices = ", ".join(m.name for m in enum_cls)
    if isinstance(value, str) and value.upper() in enum_cls.__members__:
        return enum_cls[value.upper()]
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return enum_cls(value)
        except ValueError:
            pass
    raise ValueError(f"{arg}={value!r} is not a {enum_cls.__name__}; choose one of {choices}")
