"""Parity: ``space_timesteps`` (every case, incl. the rejected ones) and SpacedDiffusion betas (``respacing.json``)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import reference_json, reference_params

from iddpm.diffusion import (
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    create_gaussian_diffusion,
    get_named_beta_schedule,
    space_timesteps,
)

_JSON = reference_json("respacing.json")


def _params(section):
    return reference_params(_JSON, section, id=lambda e: (
        f"{e.get('schedule', 'T')}{e.get('num_timesteps', e.get('original_num_steps'))}-{e['section_counts']}"))


@pytest.mark.parametrize("case", _params("space_timesteps"))
def test_space_timesteps(reference_dir, case):
    T, sections = case["num_timesteps"], case["section_counts"]
    if case["error"] is not None:
        assert case["error"] == "ValueError"
        with pytest.raises(ValueError, match=f"timestep respacing '{sections}'"):
            space_timesteps(T, sections)
        return
    got = space_timesteps(T, sections)
    assert isinstance(got, set)
    assert sorted(got) == case["result"]
    assert len(got) == case["count"]


@pytest.mark.parametrize("case", _params("spaced_diffusion"))
def test_spaced_diffusion(reference_dir, case):
    T = case["original_num_steps"]
    diff = SpacedDiffusion(
        space_timesteps(T, case["section_counts"]),
        betas=get_named_beta_schedule(case["schedule"], T),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.LEARNED_RANGE,
        loss_type=LossType.RESCALED_MSE,
        rescale_timesteps=True,
    )
    assert diff.timestep_map == case["timestep_map"]
    assert diff.num_timesteps == case["num_timesteps"] and diff.original_num_steps == T
    np.testing.assert_allclose(diff.betas, case["betas"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(diff.alphas_cumprod, case["alphas_cumprod"], rtol=1e-12, atol=0)
    # The factory builds the same diffusion.
    fac = create_gaussian_diffusion(
        steps=T,
        learn_sigma=True,
        noise_schedule=case["schedule"],
        rescale_timesteps=True,
        rescale_learned_sigmas=True,
        timestep_respacing=case["section_counts"],
    )
    assert fac.timestep_map == diff.timestep_map
    np.testing.assert_array_equal(fac.betas, diff.betas)
    assert (fac.model_var_type, fac.loss_type) == (ModelVarType.LEARNED_RANGE, LossType.RESCALED_MSE)


def test_documented_rounding_examples():
    # Python round() rounds half to even (reference README item 12).
    assert sorted(space_timesteps(11, "5")) == [0, 2, 5, 8, 10]
    assert sorted(space_timesteps(100, "1,5")) == [0, 50, 62, 74, 87, 99]
    assert sorted(space_timesteps(100, [1, 5])) == [0, 50, 62, 74, 87, 99]


@pytest.mark.parametrize(
    ("T", "request_", "message"),
    [
        (
            1000,
            "ddim750",
            r"1000 steps cannot be strided into exactly 750 with an integer stride; try ddim500 or "
            r"ddim1000 or 750",
        ),
        (4, "ddim3", r"try ddim2 or ddim4 or 3"),
        (
            300,
            "10,15,200",
            r"section 3 of 3 has 100 of the 300 steps and cannot be divided into 200; use at most 100 "
            r"there \(e.g. '10,15,100'\)",
        ),
        (100, "abc", r"expected 'N', 'ddimN' or comma-separated counts"),
        (100, "ddimX", r"expected ddimN with an integer N"),
        (100, "", r"expected 'N', 'ddimN'"),
        (100, "-3", r"counts must be >= 0"),
    ],
)
def test_impossible_requests_name_the_request_and_suggest(T, request_, message):
    with pytest.raises(ValueError, match=message):
        space_timesteps(T, request_)
