"""Networks only: the improved-diffusion U-Net family, its builders and the fast path.

``UNetModel`` / ``SuperResModel`` have the original's constructor arguments and state_dict keys
(released checkpoints load with ``strict=True``); ``create_model`` / ``sr_create_model`` are the
scripts' factories; ``optimize(model, mode)`` returns the channels_last (optionally compiled) module
that training and sampling use.
"""

from iddpm.models.builders import attention_downsample_rates, create_model, default_channel_mult, sr_create_model
from iddpm.models.layers import timestep_embedding
from iddpm.models.optimize import OptimizedUNet, optimize, tune_cpu_allocator
from iddpm.models.unet import SuperResModel, UNetModel

__all__ = [
    "UNetModel",
    "SuperResModel",
    "create_model",
    "sr_create_model",
    "default_channel_mult",
    "attention_downsample_rates",
    "optimize",
    "OptimizedUNet",
    "tune_cpu_allocator",
    "timestep_embedding",
]
