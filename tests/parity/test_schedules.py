"""Parity: beta schedules and the float64 tables of GaussianDiffusion (``schedules.npz/json``), rtol 1e-12."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import reference_json, reference_params

from iddpm.diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, get_named_beta_schedule

_JSON = reference_json("schedules.json")


def _params(section):
    return reference_params(_JSON, section)


@pytest.fixture(scope="module")
def ref(reference_dir):
    with np.load(reference_dir / "schedules.npz") as z:
        return _JSON, {k: z[k] for k in z.files}


@pytest.mark.parametrize("key", _params("betas"))
def test_named_beta_schedule(ref, key):
    js, z = ref
    e = js["betas"][key]
    name, _ = key.split(".")
    betas = get_named_beta_schedule(name, e["T"])
    assert betas.dtype == np.float64 and betas.shape == (e["len"],)
    np.testing.assert_allclose(betas, z[e["npz_key"]], rtol=1e-12, atol=0)
    np.testing.assert_allclose(betas[:5], e["first5"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(betas[-5:], e["last5"], rtol=1e-12, atol=0)
    np.testing.assert_allclose([betas.sum(), betas.min(), betas.max()], [e["sum"], e["min"], e["max"]], rtol=1e-12)
    assert int((betas == 0.999).sum()) == e["num_clipped_at_0.999"]
    if e.get("values") is not None:
        np.testing.assert_allclose(betas, e["values"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("key", _params("gaussian_diffusion_tables"))
def test_gaussian_diffusion_tables(ref, key):
    js, z = ref
    tables = js["gaussian_diffusion_tables"][key]
    name, steps = key.split(".")
    diff = GaussianDiffusion(
        betas=get_named_beta_schedule(name, int(steps)),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.FIXED_SMALL,
        loss_type=LossType.MSE,
    )
    assert len(tables) == 13
    for table, npz_key in tables.items():
        got = getattr(diff, table)
        assert got.dtype == np.float64, table
        np.testing.assert_allclose(got, z[npz_key], rtol=1e-12, atol=0, err_msg=table)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'; choose one of linear, cosine"):
        get_named_beta_schedule("quadratic", 10)
