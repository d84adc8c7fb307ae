"""Continuous time and step grids of the few-step solvers (iddpm.diffusion.timesteps)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iddpm.diffusion import SCHEDULES, get_named_beta_schedule, solver_timesteps, space_timesteps
from iddpm.diffusion.schedules import diffusion_tables
from iddpm.diffusion.timesteps import KARRAS_RHO, ContinuousTime


def abar_of(noise_schedule: str, T: int) -> np.ndarray:
    return diffusion_tables(get_named_beta_schedule(noise_schedule, T))["alphas_cumprod"]


@settings(max_examples=60, deadline=None)
@given(
    noise_schedule=st.sampled_from(["linear", "cosine"]),
    T=st.integers(21, 4000),
    steps=st.integers(2, 300),
    schedule=st.sampled_from(SCHEDULES),
)
def test_grid_definition(noise_schedule, T, steps, schedule):
    """``steps`` points (one model evaluation each), T-1 first, 0 last, strictly decreasing, lambda increasing."""
    abar = abar_of(noise_schedule, T)
    ts = solver_timesteps(T, abar, steps, schedule)
    assert ts.dtype == np.float64 and ts.shape == (steps,)
    assert ts[0] == T - 1 and ts[-1] == 0
    assert (np.diff(ts) < 0).all()
    lam, alpha, sigma = ContinuousTime(abar).coefficients(ts)
    assert (np.diff(lam) > 0).all()
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-14)


def test_each_schedule_is_even_in_its_own_variable():
    abar = abar_of("cosine", 1000)
    ct = ContinuousTime(abar)
    ls_max, ls_min = ct.log_sigma_table[-1], ct.log_sigma_table[0]
    uniform = solver_timesteps(1000, abar, 12, "uniform")
    np.testing.assert_allclose(np.diff(uniform), -999 / 11, rtol=1e-12)
    lam = ct.coefficients(solver_timesteps(1000, abar, 12, "logsnr"))[0]
    np.testing.assert_allclose(np.diff(lam), (ls_max - ls_min) / 11, rtol=1e-9)
    log_sigma = ct.log_sigma(solver_timesteps(1000, abar, 12, "karras"))
    ramp = np.exp(log_sigma / KARRAS_RHO)  # sigma^(1/rho)
    np.testing.assert_allclose(np.diff(ramp), (np.exp(ls_min / 7) - np.exp(ls_max / 7)) / 11, rtol=1e-9)


def test_uniform_grid_is_the_respacing_grid_when_strides_are_whole():
    for T, steps in [(1000, 10), (1000, 28), (4000, 32)]:
        ts = solver_timesteps(T, abar_of("linear", T), steps, "uniform")
        np.testing.assert_array_equal(ts[::-1], sorted(space_timesteps(T, str(steps))))


def test_interpolation_reproduces_the_table_and_is_linear_in_log_sigma():
    abar = abar_of("linear", 1000)
    ct = ContinuousTime(abar)
    lam, alpha, sigma = ct.coefficients(np.arange(1000.0))
    np.testing.assert_allclose(alpha, np.sqrt(abar), rtol=1e-14)
    np.testing.assert_allclose(sigma, np.sqrt(1 - abar), rtol=1e-12)
    mid = ct.log_sigma(np.array([10.25]))
    np.testing.assert_allclose(mid, 0.75 * ct.log_sigma_table[10] + 0.25 * ct.log_sigma_table[11], rtol=1e-14)
    np.testing.assert_allclose(ct.t_of_log_sigma(mid), [10.25], rtol=1e-13)


def test_one_step_grid_and_bad_requests():
    abar = abar_of("linear", 100)
    for schedule in SCHEDULES:
        np.testing.assert_array_equal(solver_timesteps(100, abar, 1, schedule), [99.0])
    with pytest.raises(ValueError, match="schedule='quadratic' is not known; choose one of uniform, logsnr, karras"):
        solver_timesteps(100, abar, 5, "quadratic")
    for bad in (0, -3, 1.5, None):
        with pytest.raises(ValueError, match=f"steps={bad!r}"):
            solver_timesteps(100, abar, bad, "uniform")
    with pytest.raises(ValueError, match="num_timesteps=99 but alphas_cumprod has 100 entries"):
        solver_timesteps(99, abar, 5, "uniform")
    with pytest.raises(ValueError, match="strictly decreasing"):
        ContinuousTime(np.array([0.9, 0.9, 0.5]))
