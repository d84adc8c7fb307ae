"""Few-step solvers wired into sampling: generate(sampler=...), api.sample / api.upsample, the plan of the flags.

The solver maths is pinned in test_solvers.py; here: per-sample noise (batch-size invariance, SDE included), the
full-T diffusion built for a run, model times of a rescaled 4000-step model, 1-channel learned sigmas, labels,
low_res, trajectories, DDIM-ODE against the respaced DDIM loop, and one-line errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_same_images, random_weights, toy_model

from iddpm import api
from iddpm.checkpoints.model_file import save_model_file
from iddpm.config import ConfigError, RunConfig, SampleConfig, apply_overrides
from iddpm.config.commands import SAMPLERS, SOLVER_SCHEDULES
from iddpm.diffusion import create_gaussian_diffusion, space_timesteps
from iddpm.diffusion.solvers import DEFAULT_SCHEDULE, SOLVERS, solve
from iddpm.diffusion.timesteps import SCHEDULES, solver_timesteps
from iddpm.sample import PerSampleNoise, gather_results, generate, plan_sampling, trajectory_frame_steps

SHAPE = (3, 4, 4)
# A 1-channel, learned-sigma 8x8 U-Net (as the digits models) on a cosine schedule of T steps.
TINY = dict(image_size=8, in_channels=1, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="4", learn_sigma=True, noise_schedule="cosine", rescale_timesteps=True)


class TimeRecorder:
    """A learned-sigma stand-in (2C output channels) that records the model times it is given."""

    def __init__(self):
        self.times: list[torch.Tensor] = []

    def __call__(self, x, t, **kwargs):
        self.times.append(t.detach().clone())
        eps = toy_model(x, t)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)


def tiny_run_cfg(**overrides) -> RunConfig:
    return apply_overrides(RunConfig(), dict(TINY, diffusion_steps=20, **overrides)).validate()


@pytest.fixture(scope="module")
def diffusion():
    return create_gaussian_diffusion(steps=30, noise_schedule="cosine", rescale_timesteps=True)


def run(diffusion, **kw):
    args = dict(num_samples=5, batch_size=5, image_shape=SHAPE, seed=3, progress=False, return_float=True)
    args.update(kw)
    return generate(toy_model, diffusion, **args)


def test_config_names_are_the_solvers_own():
    assert tuple(SAMPLERS) == ("ancestral", "ddim", *SOLVERS)
    assert SOLVER_SCHEDULES == SCHEDULES


@pytest.mark.parametrize("sampler", ["dpm++2m", "dpm++2m-sde"])
def test_same_seed_same_images_for_batch_sizes_1_2_5(diffusion, sampler):
    ref = run(diffusion, sampler=sampler, steps=8)
    assert ref.nfe == 8
    for bs in (1, 2):
        got = run(diffusion, sampler=sampler, steps=8, batch_size=bs)
        np.testing.assert_array_equal(got.images, ref.images)
        np.testing.assert_allclose(got.samples, ref.samples, rtol=0, atol=1e-6)
    other = run(diffusion, sampler=sampler, steps=8, seed=4)
    assert not np.allclose(other.samples, ref.samples)


def test_solver_runs_on_the_seeded_x_T_and_sde_noise_from_the_same_streams(diffusion):
    streams = PerSampleNoise(3, range(5), SHAPE)
    x_T = streams.draw()
    ode = solve(toy_model, diffusion, x_T, sampler="dpm++2m", steps=8)
    np.testing.assert_allclose(run(diffusion, sampler="dpm++2m", steps=8, batch_size=2).samples, ode.sample.numpy(),
                               rtol=0, atol=1e-6)
    sde = solve(toy_model, diffusion, x_T, sampler="dpm++2m-sde", steps=8, noise_like=streams.draw_like)
    np.testing.assert_allclose(run(diffusion, sampler="dpm++2m-sde", steps=8).samples, sde.sample.numpy(),
                               rtol=0, atol=1e-6)
    assert not np.allclose(sde.sample.numpy(), ode.sample.numpy())  # the SDE noise is used


@pytest.mark.parametrize("sampler", SOLVERS)
def test_every_solver_and_schedule_through_generate(diffusion, sampler):
    for schedule in SCHEDULES:
        res = run(diffusion, sampler=sampler, steps=6, schedule=schedule, num_samples=2)
        assert res.nfe == 6 and res.images.shape == (2, 4, 4, 3) and np.isfinite(res.samples).all()
    assert run(diffusion, sampler=sampler, num_samples=1).nfe == diffusion.num_timesteps  # steps 0 = T


def test_distributed_shares_gather_to_the_single_process_result(diffusion):
    kw = dict(num_samples=7, batch_size=2, sampler="dpm++2m-sde", steps=5)
    single = run(diffusion, **kw)
    merged = gather_results([run(diffusion, rank=r, world_size=3, **kw) for r in range(3)])
    np.testing.assert_array_equal(merged.samples, single.samples)
    assert merged.nfe == 5


def test_labels_and_low_res_reach_the_model_with_a_solver(diffusion):
    kw = dict(num_samples=6, batch_size=4, sampler="unipc", steps=6)
    bal = run(diffusion, classes="balanced", num_classes=3, **kw)
    fixed = run(diffusion, classes=2, num_classes=3, **kw)
    np.testing.assert_array_equal(bal.labels, [0, 1, 2, 0, 1, 2])
    np.testing.assert_allclose(bal.samples[2], fixed.samples[2], atol=1e-6)  # same label, same x_T
    assert not np.allclose(bal.samples[0], fixed.samples[0])
    low = torch.linspace(-1, 1, 6).reshape(6, 1, 1, 1).expand(6, 3, 2, 2).contiguous()
    with_low = run(diffusion, model_kwargs_fn=lambda idx: {"low_res": low[torch.from_numpy(idx)]}, **kw)
    assert not np.allclose(with_low.samples, run(diffusion, **kw).samples)


def test_solver_trajectory_frames_are_labelled_by_steps_left(diffusion):
    res = run(diffusion, sampler="dpm++3m", steps=9, return_trajectory=True, trajectory_samples=3,
              trajectory_frames=4, batch_size=2)
    assert res.trajectory_steps == trajectory_frame_steps(9, 4) == [9, 6, 3, 0]
    assert res.trajectory.shape == (4, 3, 4, 4, 3)
    np.testing.assert_array_equal(res.trajectory[-1], res.images[:3])
    x_T = PerSampleNoise(3, range(3), SHAPE).draw()
    np.testing.assert_array_equal(res.trajectory[0], ((x_T + 1) * 127.5).clamp(0, 255).to(torch.uint8)
                                  .permute(0, 2, 3, 1).numpy())


def test_generate_refuses_mixed_methods(diffusion):
    with pytest.raises(ValueError, match="use_ddim=True contradicts sampler='dpm\\+\\+2m'"):
        run(diffusion, sampler="dpm++2m", use_ddim=True)
    with pytest.raises(ValueError, match="sampler='euler' is not known"):
        run(diffusion, sampler="euler")
    with pytest.raises(ValueError, match="steps=7: ancestral steps the .* 30 timesteps"):
        run(diffusion, sampler="ancestral", steps=7)
    with pytest.raises(ValueError, match="schedule='karras' is only for the solvers"):
        run(diffusion, schedule="karras")
    respaced = create_gaussian_diffusion(steps=30, timestep_respacing="10")
    with pytest.raises(ValueError, match="the solvers need the full diffusion"):
        run(respaced, sampler="dpm++2m", steps=5)
    # ancestral / ddim by name are the loops: bit-identical to the "" spelling
    np.testing.assert_array_equal(run(diffusion, sampler="ddim").samples, run(diffusion, use_ddim=True).samples)
    np.testing.assert_array_equal(run(diffusion, sampler="ancestral").samples, run(diffusion).samples)


# ------------------------------------------------------------------ api.sample
def test_rescaled_4000_step_model_gets_times_in_0_1000_through_api():
    cfg = apply_overrides(RunConfig(), dict(TINY, diffusion_steps=4000)).validate()
    d = api.build_diffusion(cfg.diffusion, "")
    model = TimeRecorder()
    res = api.sample(model=model, diffusion=d, cfg=cfg, num_samples=2, sampler="dpm++2m", steps=7, fast=False)
    times = torch.stack(model.times)
    assert res.nfe == 7 and times.shape == (7, 2) and times.dtype == torch.float32
    assert times.min() == 0 and times.max() == pytest.approx(999.75) and times.max() < 1000
    grid = solver_timesteps(4000, d.alphas_cumprod, 7, "logsnr")
    np.testing.assert_allclose(times[:, 0].numpy(), grid * 1000 / 4000, rtol=1e-6)
    assert not np.allclose(grid, np.round(grid))  # real t between the integer steps
    # a respaced diffusion is replaced by the full one; steps 0 takes the respacing's count
    model.times.clear()
    res = api.sample(model=model, diffusion=d, cfg=cfg, num_samples=1, sampler="dpm++2m", fast=False,
                     timestep_respacing="12")
    assert res.nfe == 12 == len(model.times) and res.info["timestep_respacing"] == ""
    assert torch.stack(model.times).max() == pytest.approx(999.75)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """A 1-channel learned-sigma U-Net file (T = 20) with random weights."""
    return save_model_file(tmp_path_factory.mktemp("tiny") / "tiny.safetensors", random_weights(tiny_run_cfg()),
                           tiny_run_cfg())


@pytest.mark.parametrize("sampler", ["dpm++2m", "dpm++2m-sde"])
def test_one_channel_learned_sigma_run_through_api_is_batch_size_invariant(tiny_file, sampler):
    kw = dict(num_samples=5, seed=2, sampler=sampler, steps=6, return_float=True, fast=False)
    ref = api.sample(tiny_file, batch_size=5, **kw)
    assert ref.images.shape == (5, 8, 8, 1) and ref.images.std() > 0 and ref.nfe == 6
    for bs in (1, 2):  # the same noise; what remains is the network's float32 round-off across batch shapes
        got = api.sample(tiny_file, batch_size=bs, **kw)
        np.testing.assert_allclose(got.samples, ref.samples, rtol=0, atol=1e-3)
        assert_same_images(got.images, ref.images)
    info = ref.info
    assert (info["sampler"], info["schedule"], info["steps"], info["nfe"]) == (sampler, "logsnr", 6, 6)
    assert info["num_sampling_steps"] == 6 and info["timestep_respacing"] == ""


@pytest.mark.parametrize("T,steps,coincide", [(21, 5, True), (21, 11, True), (20, 5, False)])
def test_ddim_ode_equals_ddim_on_the_same_grid(T, steps, coincide):
    """The solver's uniform grid is ``linspace(T-1, 0, steps)``; ``space_timesteps(T, str(steps))`` rounds the same
    points, so they coincide when steps-1 divides T-1 (then also ``ddimN``'s stride grid, when it starts at T-1)."""
    cfg = apply_overrides(RunConfig(), dict(TINY, diffusion_steps=T, learn_sigma=False)).validate()
    d = api.build_diffusion(cfg.diffusion, "")
    grid = solver_timesteps(T, d.alphas_cumprod, steps, "uniform")
    spaced = sorted(space_timesteps(T, str(steps)))
    assert np.array_equal(grid[::-1], spaced) == coincide
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    kw = dict(model=toy_model, cfg=cfg, num_samples=4, x_T=x_T, return_float=True, fast=False)
    ode = api.sample(diffusion=d, sampler="ddim-ode", steps=steps, **kw).samples
    ddim = api.sample(diffusion=d, use_ddim=True, timestep_respacing=str(steps), **kw).samples
    by_name = api.sample(diffusion=d, sampler="ddim", steps=steps, **kw).samples  # --steps N = respacing "N"
    np.testing.assert_array_equal(by_name, ddim)
    if coincide:
        np.testing.assert_allclose(ode, ddim, rtol=0, atol=2e-6)
        ddim_n = api.sample(diffusion=d, use_ddim=True, timestep_respacing=f"ddim{steps}", **kw).samples
        np.testing.assert_allclose(ode, ddim_n, rtol=0, atol=2e-6)  # range(0, T, (T-1)/(steps-1)): the same grid
    else:  # rounded integer t (0, 5, 10, 14, 19) vs real t (0, 4.75, 9.5, 14.25, 19): close, not equal
        assert np.abs(ode - ddim).max() > 1e-4


def test_class_conditional_run_with_a_solver(tmp_path):
    cfg = tiny_run_cfg(class_cond=True, num_classes=3)
    file = save_model_file(tmp_path / "cond.safetensors", random_weights(cfg), cfg)
    res = api.sample(file, num_samples=6, batch_size=4, classes="balanced", sampler="unipc", steps=5, fast=False,
                     return_float=True)
    np.testing.assert_array_equal(res.labels, [0, 1, 2, 0, 1, 2])
    one = api.sample(file, num_samples=6, classes=1, sampler="unipc", steps=5, fast=False, return_float=True)
    np.testing.assert_allclose(one.samples[1], res.samples[1], atol=1e-4)
    assert not np.allclose(one.samples[0], res.samples[0], atol=1e-3)


def test_super_resolution_with_a_solver(tmp_path):
    cfg = tiny_run_cfg(small_size=4, in_channels=3)
    file = save_model_file(tmp_path / "sr.safetensors", random_weights(cfg), cfg)
    base = np.random.default_rng(0).integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8)
    kw = dict(sampler="dpm++2m-sde", steps=5, fast=False, seed=1)
    a = api.upsample(file, base, batch_size=3, **kw)
    assert a.images.shape == (3, 8, 8, 3) and a.nfe == 5 and a.info["sampler"] == "dpm++2m-sde"
    np.testing.assert_array_equal(api.upsample(file, base, batch_size=1, **kw).images, a.images)
    assert not np.array_equal(api.upsample(file, 255 - base, batch_size=3, **kw).images, a.images)


# ------------------------------------------------------------------ the flags' plan
def test_plan_resolves_sampler_steps_and_schedule():
    plan = plan_sampling(SampleConfig(sampler="dpm++3m", steps=10).validate(), None)
    assert (plan.sampler, plan.steps, plan.schedule, plan.solver) == ("dpm++3m", 10, DEFAULT_SCHEDULE["dpm++3m"], True)
    assert plan_sampling(SampleConfig(sampler="unipc", schedule="karras").validate(), "25").timestep_respacing == "25"
    ddim = plan_sampling(SampleConfig(sampler="ddim", steps=8).validate(), None)
    assert (ddim.use_ddim, ddim.timestep_respacing, ddim.solver) == (True, "8", False)
    assert plan_sampling(SampleConfig(use_ddim=True).validate(), "ddim5").loop_kwargs() == dict(
        use_ddim=True, sampler="ddim", steps=0, schedule="")
    assert plan_sampling(SampleConfig().validate(), None).describe(250) == "ancestral, 250 steps (NFE 250)"
    assert plan.describe(10) == "dpm++3m, 10 steps on the logsnr grid (NFE 10)"


@pytest.mark.parametrize("settings,respacing,message", [
    (dict(sampler="euler"), None, "--sampler 'euler': unknown; choose one of ancestral, ddim, dpm++2m"),
    (dict(sampler="dpm++2m", schedule="cosine"), None, "--schedule 'cosine': unknown; choose one of uniform"),
    (dict(schedule="karras"), None, "--schedule karras: only for the solvers"),
    (dict(sampler="unipc", use_ddim=True), None, "--use_ddim: not with --sampler unipc"),
    (dict(sampler="ancestral", use_ddim=True), None, "--use_ddim: not with --sampler ancestral"),
    (dict(sampler="dpm++2m", eta=0.5), None, "--eta 0.5: only used with --use_ddim (or --sampler ddim)"),
    (dict(steps=-1), None, "--steps -1: must be >= 1"),
    (dict(sampler="dpm++2m", steps=15), "50", "--steps 15: not with --timestep_respacing 50"),
    (dict(steps=15), "ddim50", "--steps 15: not with --timestep_respacing ddim50"),
])
def test_bad_combinations_are_one_line_errors(settings, respacing, message):
    with pytest.raises(ConfigError) as err:
        plan_sampling(SampleConfig(**settings).validate(), respacing)
    assert message in str(err.value) and "\n" not in str(err.value)
