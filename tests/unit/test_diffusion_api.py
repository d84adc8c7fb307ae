"""Unit tests of the diffusion API: factory, enums, timestep mapping, RNG seams, errors, distributed resampler."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import iddpm.diffusion as D
from iddpm.diffusion import (
    GaussianDiffusion,
    LossSecondMomentResampler,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    create_gaussian_diffusion,
    get_named_beta_schedule,
    space_timesteps,
)

PUBLIC = [
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "GaussianDiffusion",
    "SpacedDiffusion",
    "space_timesteps",
    "get_named_beta_schedule",
    "betas_for_alpha_bar",
    "create_gaussian_diffusion",
    "UniformSampler",
    "LossSecondMomentResampler",
    "create_named_schedule_sampler",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
]


def toy(x, ts):
    """Analytic eps model with learned-range variance (2C channels)."""
    s = ts.to(torch.float32).view(-1, *([1] * (x.ndim - 1)))
    return torch.cat(
        [torch.tanh(0.7 * x + 0.3 * torch.sin(s / 100)), torch.tanh(0.5 * x - 0.2 * torch.cos(s / 100))], 1
    )


def small(**kw):
    kw.setdefault("learn_sigma", True)
    return create_gaussian_diffusion(steps=30, noise_schedule="cosine", **kw)


def test_public_names():
    for name in PUBLIC:
        assert hasattr(D, name) and name in D.__all__, name
    assert {m.name: m.value for m in ModelMeanType} == {"PREVIOUS_X": 1, "START_X": 2, "EPSILON": 3}
    assert {m.name: m.value for m in ModelVarType} == {
        "LEARNED": 1,
        "FIXED_SMALL": 2,
        "FIXED_LARGE": 3,
        "LEARNED_RANGE": 4,
    }
    assert {m.name: m.value for m in LossType} == {"MSE": 1, "RESCALED_MSE": 2, "KL": 3, "RESCALED_KL": 4}


def test_factory_defaults_and_flags():
    d = create_gaussian_diffusion()
    assert isinstance(d, SpacedDiffusion) and d.num_timesteps == d.original_num_steps == 1000
    assert (d.model_mean_type, d.model_var_type, d.loss_type) == (
        ModelMeanType.EPSILON,
        ModelVarType.FIXED_LARGE,
        LossType.MSE,
    )
    assert d.rescale_timesteps is False
    # Like the original, the factory always respaces, so betas are re-derived as 1 - abar_t / abar_{t-1}.
    np.testing.assert_allclose(d.betas, get_named_beta_schedule("linear", 1000), rtol=1e-11, atol=0)
    d = create_gaussian_diffusion(
        steps=100, sigma_small=True, predict_xstart=True, rescale_learned_sigmas=True, timestep_respacing="ddim10"
    )
    assert (d.model_mean_type, d.model_var_type, d.loss_type) == (
        ModelMeanType.START_X,
        ModelVarType.FIXED_SMALL,
        LossType.RESCALED_MSE,
    )
    assert d.num_timesteps == 10 and d.timestep_map == list(range(0, 100, 10))
    assert create_gaussian_diffusion(use_kl=True, rescale_learned_sigmas=True).loss_type == LossType.RESCALED_KL
    assert create_gaussian_diffusion(learn_sigma=True).model_var_type == ModelVarType.LEARNED_RANGE


def test_enum_arguments_are_coerced_or_rejected():
    betas = get_named_beta_schedule("cosine", 10)
    d = GaussianDiffusion(betas=betas, model_mean_type="epsilon", model_var_type=4, loss_type="RESCALED_MSE")
    assert (d.model_mean_type, d.model_var_type, d.loss_type) == (
        ModelMeanType.EPSILON,
        ModelVarType.LEARNED_RANGE,
        LossType.RESCALED_MSE,
    )
    with pytest.raises(ValueError, match="model_var_type='wide' is not a ModelVarType; choose one of LEARNED"):
        GaussianDiffusion(betas=betas, model_mean_type=3, model_var_type="wide", loss_type=1)
    with pytest.raises(ValueError, match="loss_type=7 is not a LossType"):
        GaussianDiffusion(betas=betas, model_mean_type=3, model_var_type=2, loss_type=7)


@pytest.mark.parametrize(
    ("betas", "message"),
    [
        ([0.1], "at least 2 steps"),
        ([0.1, 0.0], r"betas must lie in \(0, 1\]"),
        ([0.1, 1.5], "betas must lie"),
        ([[0.1, 0.2]], "betas must be 1-D"),
    ],
)
def test_bad_betas_are_rejected(betas, message):
    with pytest.raises(ValueError, match=message):
        GaussianDiffusion(betas=betas, model_mean_type=3, model_var_type=2, loss_type=1)


def test_bad_schedule_requests_are_rejected():
    with pytest.raises(ValueError, match="linear schedule needs at least 21 steps"):
        create_gaussian_diffusion(steps=10)
    with pytest.raises(ValueError, match="unknown beta schedule 'sqrt'"):
        create_gaussian_diffusion(noise_schedule="sqrt")
    with pytest.raises(
        ValueError, match="'ddim11': 100 steps cannot be strided into exactly 11 .* try ddim10 or ddim12 or 11"
    ):
        create_gaussian_diffusion(steps=100, timestep_respacing="ddim11")
    with pytest.raises(ValueError, match=r"use_timesteps must lie in 0..29; got \[30\]"):
        SpacedDiffusion(
            [0, 30], betas=get_named_beta_schedule("cosine", 30), model_mean_type=3, model_var_type=2, loss_type=1
        )


def test_model_timesteps_are_float32_products():
    # T = 60: float32(t) * float32(1000/60) differs from rounding the float64 product for some t.
    d = GaussianDiffusion(
        betas=get_named_beta_schedule("cosine", 60),
        model_mean_type=3,
        model_var_type=2,
        loss_type=1,
        rescale_timesteps=True,
    )
    t = torch.arange(60)
    got = d.model_timesteps(t)
    expected = t.numpy().astype(np.float32) * np.float32(1000 / 60)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), expected)
    assert not np.array_equal(expected, (t.numpy() * (1000 / 60)).astype(np.float32))
    d.rescale_timesteps = False
    assert d.model_timesteps(t) is t


def test_spaced_model_timesteps_use_original_steps():
    d = create_gaussian_diffusion(steps=4000, timestep_respacing="100", rescale_timesteps=True)
    t = torch.tensor([0, 1, 99])
    mapped = np.array(d.timestep_map)[[0, 1, 99]]
    got = d.model_timesteps(t)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), mapped.astype(np.float32) * np.float32(1000 / 4000))
    d = create_gaussian_diffusion(steps=4000, timestep_respacing="100")
    assert d.model_timesteps(t).dtype == torch.int64 and d.model_timesteps(t).tolist() == mapped.tolist()


def test_model_shape_errors():
    d = small()
    x, t = torch.zeros(2, 3, 4, 4), torch.tensor([0, 5])
    with pytest.raises(ValueError, match="needs model outputs of shape .*build the model with learn_sigma=True"):
        d.p_mean_variance(lambda x, ts: x, x, t)
    with pytest.raises(ValueError, match="build the model with learn_sigma=True"):
        d.training_losses(lambda x, ts: x, x, t)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        d.p_mean_variance(toy, x, torch.tensor([1]))
    with pytest.raises(ValueError, match="eta must be 0.0"):
        d.ddim_reverse_sample(toy, x, t, eta=0.5)
    fixed = small(learn_sigma=False)
    with pytest.raises(ValueError, match="a learn_sigma model needs LEARNED or LEARNED_RANGE"):
        fixed.p_mean_variance(toy, x, t)


def test_global_rng_draw_order_matches_the_original():
    """generator=None: x_T from torch.randn(*shape), then one randn_like per step, like the original."""
    d = small()
    shape = (2, 3, 4, 4)
    torch.manual_seed(7)
    a = d.p_sample_loop(toy, shape)
    torch.manual_seed(7)
    x_T = torch.randn(*shape)
    draws = [torch.randn_like(x_T) for _ in range(d.num_timesteps)]
    b = d.p_sample_loop(toy, shape, noise=x_T, step_noise=draws)
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(d.p_sample_loop(toy, shape, generator=g), a)  # same stream from an explicit generator


def test_generator_makes_loops_reproducible_without_touching_the_global_rng():
    d = small()
    shape = (2, 3, 4, 4)
    state = torch.get_rng_state()
    outs = [d.ddim_sample_loop(toy, shape, eta=1.0, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*outs)
    bpd = [d.calc_bpd_loop(toy, outs[0].clamp(-1, 1), generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(bpd[0]["total_bpd"], bpd[1]["total_bpd"]) and bpd[0]["vb"].shape == (2, d.num_timesteps)
    x0, t = outs[0].clamp(-1, 1), torch.tensor([0, 29])
    la = d.training_losses(toy, x0, t, generator=torch.Generator().manual_seed(4))
    lb = d.training_losses(toy, x0, t, noise=torch.randn(x0.shape, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(la["loss"], lb["loss"])
    assert torch.equal(torch.get_rng_state(), state)


def test_progressive_loops_and_progress_bar(capsys):
    d = small()
    steps = list(d.p_sample_loop_progressive(toy, (1, 3, 2, 2), progress=True, generator=torch.Generator()))
    assert len(steps) == d.num_timesteps and set(steps[0]) == {"sample", "pred_xstart"}
    assert "30/30" in capsys.readouterr().err


def test_step_noise_errors():
    d = small()
    shape = (1, 3, 2, 2)
    with pytest.raises(ValueError, match="either generator= or step_noise="):
        d.p_sample_loop(toy, shape, generator=torch.Generator(), step_noise=[])
    with pytest.raises(ValueError, match="step_noise ran out: draw 2 was requested but only 2 were given"):
        d.p_sample_loop(toy, shape, step_noise=[torch.zeros(shape)] * 2)
    with pytest.raises(ValueError, match=r"step_noise\[0\] has shape \(3,\)"):
        d.ddim_sample_loop(toy, shape, step_noise=[torch.zeros(3)])
    with pytest.raises(ValueError, match=r"noise has shape \(1, 3\), expected \(1, 3, 2, 2\)"):
        d.p_sample(toy, torch.zeros(shape), torch.tensor([3]), noise=torch.zeros(1, 3))


def test_step_noise_accepts_numpy_and_stacked_tensors():
    d = small()
    shape = (1, 3, 2, 2)
    seq = np.random.default_rng(0).standard_normal((d.num_timesteps, *shape)).astype(np.float32)
    x_T = torch.ones(shape)
    a = d.p_sample_loop(toy, shape, noise=x_T, step_noise=seq)
    b = d.p_sample_loop(toy, shape, noise=x_T, step_noise=torch.from_numpy(seq))
    assert torch.equal(a, b)


def test_float64_inputs_compute_in_float64():
    d = small()
    x0 = torch.linspace(-1, 1, 48, dtype=torch.float64).view(1, 3, 4, 4)
    t = torch.tensor([10])
    assert d.q_sample(x0, t, noise=torch.zeros_like(x0)).dtype == torch.float64
    d64 = d.p_mean_variance(lambda x, ts: torch.cat([x, x], 1), x0, t)
    assert all(v.dtype == torch.float64 for v in d64.values())


def _dist_worker(rank, world, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        s = LossSecondMomentResampler(create_gaussian_diffusion(steps=50, noise_schedule="cosine"))
        # Unequal batch sizes per rank (3 and 5): the gather pads to 5 and trims.
        n = 3 + 2 * rank
        ts = torch.arange(n) + 10 * rank
        losses = torch.arange(n, dtype=torch.float64) + 100 * rank
        s.update_with_local_losses(ts, losses)
        if rank == 0:
            np.save(result_file, np.array(s.state_dict()["loss_history"]))
    finally:
        dist.destroy_process_group()


def test_update_with_local_losses_gathers_all_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "hist.npy")
        mp.start_processes(_dist_worker, args=(2, init_file, result_file), nprocs=2, start_method="spawn")
        hist = np.load(result_file)
    expected = LossSecondMomentResampler(create_gaussian_diffusion(steps=50, noise_schedule="cosine"))
    expected.update_with_all_losses([0, 1, 2, 10, 11, 12, 13, 14], [0, 1, 2, 100, 101, 102, 103, 104])
    np.testing.assert_array_equal(hist, np.array(expected.state_dict()["loss_history"]))


def test_space_timesteps_returns_a_set():
    assert space_timesteps(10, "ddim5") == {0, 2, 4, 6, 8}
