"""Sample generation: batch-size-invariant loops, super-resolution, npz / PNG / GIF output.

Main entry points: :func:`generate` (uint8 NHWC images from a model + diffusion), :func:`upsample`
(super-resolution from base samples), :func:`plan_sampling` (``--sampler`` / ``--steps`` resolved),
:func:`save_npz` (the original's layout), :func:`save_grid`.
"""

from iddpm.sample.loop import SampleResult, gather_results, generate, resolve_labels, trajectory_frame_steps
from iddpm.sample.noise import PerSampleNoise, sample_seed
from iddpm.sample.output import (
    grid_image,
    load_npz,
    make_grid,
    npz_name,
    save_grid,
    save_npz,
    save_pngs,
    save_trajectory,
    to_uint8,
)
from iddpm.sample.plan import SamplingPlan, plan_sampling
from iddpm.sample.superres import low_res_from_uint8, upsample

__all__ = [
    "SampleResult",
    "generate",
    "gather_results",
    "resolve_labels",
    "trajectory_frame_steps",
    "PerSampleNoise",
    "sample_seed",
    "grid_image",
    "load_npz",
    "make_grid",
    "npz_name",
    "save_grid",
    "save_npz",
    "save_pngs",
    "save_trajectory",
    "to_uint8",
    "low_res_from_uint8",
    "upsample",
    "SamplingPlan",
    "plan_sampling",
]
