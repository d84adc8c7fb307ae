"""Hypothesis property tests: schedules, respacing, the posterior and q_sample moments."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iddpm.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    betas_for_alpha_bar,
    get_named_beta_schedule,
    space_timesteps,
)

FAST = settings(max_examples=40, deadline=None, derandomize=True)
schedules = st.one_of(
    st.tuples(st.just("linear"), st.integers(21, 4000)),
    st.tuples(st.just("cosine"), st.integers(2, 4000)),
)


def _diffusion(betas, cls=GaussianDiffusion, **kw):
    return cls(
        betas=betas,
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_SMALL,
        loss_type=LossType.MSE,
        **kw,
    )


@FAST
@given(schedules)
def test_named_schedules_are_valid(sched):
    name, T = sched
    betas = get_named_beta_schedule(name, T)
    assert betas.shape == (T,) and betas.dtype == np.float64
    assert (betas > 0).all() and (betas < 1).all()
    d = _diffusion(betas)
    assert (np.diff(d.alphas_cumprod) < 0).all(), "alpha-bar must be strictly decreasing"
    assert 0 < d.alphas_cumprod[-1] < d.alphas_cumprod[0] < 1
    assert (d.posterior_variance >= 0).all() and d.posterior_variance[0] == 0
    assert (d.posterior_variance[1:] > 0).all()
    # The posterior variance beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) never exceeds beta_t.
    assert (d.posterior_variance <= d.betas * (1 + 1e-12)).all()
    assert np.isfinite(d.posterior_log_variance_clipped).all()
    assert d.posterior_log_variance_clipped[0] == math.log(d.posterior_variance[1])


@FAST
@given(st.integers(2, 2000), st.floats(0.5, 4.0), st.floats(0.9, 0.999))
def test_betas_for_any_alpha_bar(T, power, max_beta):
    betas = betas_for_alpha_bar(T, lambda t: (1 - t) ** power + 1e-9, max_beta=max_beta)
    assert betas.shape == (T,) and (betas > 0).all() and (betas <= max_beta).all()
    assert (np.diff(_diffusion(betas).alphas_cumprod) < 0).all()


@FAST
@given(st.integers(2, 3000), st.lists(st.integers(1, 60), min_size=1, max_size=4))
def test_space_timesteps_keeps_the_requested_count(T, counts):
    size_per, extra = divmod(T, len(counts))
    counts = [min(c, size_per + (1 if i < extra else 0)) for i, c in enumerate(counts)]
    counts = [max(c, 1) for c in counts]
    if any(size_per + (1 if i < extra else 0) < 1 for i in range(len(counts))):
        return
    steps = space_timesteps(T, ",".join(map(str, counts)))
    assert len(steps) == sum(counts)
    assert min(steps) == 0 and max(steps) < T


@FAST
@given(st.integers(2, 3000), st.integers(1, 200))
def test_ddim_spacing_is_an_integer_stride(T, stride):
    stride = min(stride, T - 1)
    n = len(range(0, T, stride))
    steps = sorted(space_timesteps(T, f"ddim{n}"))
    assert len(steps) == n and steps[0] == 0
    assert len(set(np.diff(steps))) <= 1 and (n == 1 or steps[1] <= stride)


@FAST
@given(schedules, st.data())
def test_respacing_keeps_the_marginals(sched, data):
    name, T = sched
    kept = data.draw(st.sets(st.integers(0, T - 1), min_size=2, max_size=50))
    betas = get_named_beta_schedule(name, T)
    base, spaced = _diffusion(betas), _diffusion(betas, SpacedDiffusion, use_timesteps=kept)
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[sorted(kept)], rtol=1e-9, atol=1e-13)
    assert (spaced.betas > 0).all() and (spaced.betas < 1).all()


@settings(max_examples=15, deadline=None, derandomize=True)
@given(schedules, st.data(), st.integers(0, 2**31 - 1))
def test_q_sample_moments(sched, data, seed):
    """x_t ~ q(x_t|x_0): mean sqrt(abar_t) x_0 and variance 1 - abar_t, checked on 2 x 40000 draws."""
    name, T = sched
    d = _diffusion(get_named_beta_schedule(name, T))
    t_idx = data.draw(st.integers(0, T - 1))
    x0 = torch.tensor([[-1.0], [0.5]]).expand(2, 40000).contiguous()
    t = torch.full((2,), t_idx, dtype=torch.int64)
    x_t = d.q_sample(x0, t, generator=torch.Generator().manual_seed(seed)).double()
    abar = d.alphas_cumprod[t_idx]
    mean, var = math.sqrt(abar) * x0[:, 0].double(), 1 - abar
    n = x0.shape[1]
    # 6 standard errors (mean: sqrt(var/n); variance: var * sqrt(2/n)).
    assert (x_t.mean(1) - mean).abs().max() <= 6 * math.sqrt(var / n) + 1e-6
    assert (x_t.var(1) - var).abs().max() <= 6 * var * math.sqrt(2 / n) + 1e-6


@FAST
@given(schedules, st.data())
def test_posterior_matches_the_joint(sched, data):
    """q(x_{t-1}|x_t,x_0) is the Gaussian conditional of q(x_{t-1}, x_t | x_0): its variance is
    beta_t (1 - abar_{t-1}) / (1 - abar_t) and its mean is linear with coefficients from the joint."""
    name, T = sched
    d = _diffusion(get_named_beta_schedule(name, T))
    t = data.draw(st.integers(1, T - 1))
    a_prev, a_t, beta = d.alphas_cumprod[t - 1], d.alphas_cumprod[t], d.betas[t]
    # Joint: x_{t-1} = sqrt(a_prev) x0 + s1 e1; x_t = sqrt(1 - beta) x_{t-1} + sqrt(beta) e2.
    cov = math.sqrt(1 - beta) * (1 - a_prev)
    cond_var = (1 - a_prev) - cov**2 / (1 - a_t)
    coef2 = cov / (1 - a_t)
    coef1 = math.sqrt(a_prev) - coef2 * math.sqrt(a_t)
    assert math.isclose(d.posterior_variance[t], cond_var, rel_tol=1e-6, abs_tol=1e-15)
    assert math.isclose(d.posterior_mean_coef2[t], coef2, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(d.posterior_mean_coef1[t], coef1, rel_tol=1e-6, abs_tol=1e-9)
