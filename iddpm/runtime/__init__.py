"""Process concerns handed to the trainer as objects: the distributed context, metric sinks, seeding.

Only this package (and the timestep sampler's loss gathering) touches ``torch.distributed``.
"""

from iddpm.runtime.distributed import DistContext, init_distributed, resolve_device
from iddpm.runtime.seeding import capture_rng_state, example_seed, restore_rng_state, seed_everything
from iddpm.runtime.sinks import CSVSink, MetricSink, MultiSink, ProgressBar, TensorBoardSink, make_sinks

__all__ = [
    "DistContext",
    "init_distributed",
    "resolve_device",
    "seed_everything",
    "capture_rng_state",
    "restore_rng_state",
    "example_seed",
    "MetricSink",
    "CSVSink",
    "TensorBoardSink",
    "MultiSink",
    "ProgressBar",
    "make_sinks",
]
