"""Parity: LossSecondMomentResampler weights over the reference's loss history (``resampler.json``)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from iddpm.diffusion import LossSecondMomentResampler, UniformSampler, create_named_schedule_sampler


@pytest.fixture(scope="module")
def ref(reference_dir):
    return json.loads((reference_dir / "resampler.json").read_text())


def _sampler(ref):
    diffusion = types.SimpleNamespace(num_timesteps=ref["num_timesteps"])
    s = LossSecondMomentResampler(diffusion, history_per_term=ref["history_per_term"], uniform_prob=ref["uniform_prob"])
    assert (s.history_per_term, s.uniform_prob) == (10, 0.001)
    return s


def test_weights_history(ref):
    s = _sampler(ref)
    checkpoints = {w["after_batches"]: w["weights"] for w in ref["weights_after"]}
    assert min(checkpoints) == ref["warmed_up_after_batches"]
    for n, batch in enumerate(ref["batches"], start=1):
        if n <= ref["warmed_up_after_batches"] - 1:
            np.testing.assert_array_equal(s.weights(), ref["weights_before_warmup"])
        s.update_with_all_losses(batch["ts"], batch["losses"])
        if n == ref["warmed_up_after_batches"] - 1:
            np.testing.assert_array_equal(s.weights(), ref["weights_before_warmup"])
        if n in checkpoints:
            np.testing.assert_allclose(s.weights(), checkpoints[n], rtol=1e-12, atol=0, err_msg=f"after {n}")
    np.testing.assert_allclose(s.state_dict()["loss_history"], ref["final_loss_history"], rtol=0, atol=0)
    assert all(n <= len(ref["batches"]) for n in checkpoints)


def test_sample_importance_weights(ref):
    s = _sampler(ref)
    for batch in ref["batches"]:
        s.update_with_all_losses(batch["ts"], batch["losses"])
    w = s.weights()
    p = w / w.sum()
    ex = ref["sample_example"]
    # The reference's indices came from NumPy's global RNG; only weight = 1/(T p[index]) is meaningful.
    expected = np.array(ex["importance_weights"], dtype=np.float32)
    np.testing.assert_allclose(1 / (len(p) * p[ex["indices"]]), expected, rtol=1e-6)
    t, weights = s.sample(8, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and weights.dtype == torch.float32 and t.shape == weights.shape == (8,)
    np.testing.assert_array_equal(weights.numpy(), (1 / (len(p) * p[t.numpy()])).astype(np.float32))


def test_sample_is_reproducible_and_follows_the_weights(ref):
    s = _sampler(ref)
    for batch in ref["batches"]:
        s.update_with_all_losses(batch["ts"], batch["losses"])
    a = s.sample(64, "cpu", generator=torch.Generator().manual_seed(5))
    b = s.sample(64, "cpu", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    t, _ = s.sample(20000, "cpu", generator=torch.Generator().manual_seed(1))
    freq = np.bincount(t.numpy(), minlength=ref["num_timesteps"]) / 20000
    p = s.weights() / s.weights().sum()
    assert np.abs(freq - p).max() < 0.01


def test_state_dict_round_trip_resumes_exactly(ref):
    s = _sampler(ref)
    half = len(ref["batches"]) // 2
    for batch in ref["batches"][:half]:
        s.update_with_all_losses(batch["ts"], batch["losses"])
    state = json.loads(json.dumps(s.state_dict()))  # must survive JSON
    r = _sampler(ref)
    r.load_state_dict(state)
    for batch in ref["batches"][half:]:
        s.update_with_all_losses(batch["ts"], batch["losses"])
        r.update_with_all_losses(batch["ts"], batch["losses"])
    np.testing.assert_array_equal(s.weights(), r.weights())
    with pytest.raises(ValueError, match="sampler state is for 'UniformSampler'"):
        r.load_state_dict(UniformSampler(types.SimpleNamespace(num_timesteps=50)).state_dict())


def test_update_with_local_losses_single_process(ref):
    s = _sampler(ref)
    batch = ref["batches"][0]
    s.update_with_local_losses(torch.tensor(batch["ts"]), torch.tensor(batch["losses"], dtype=torch.float64))
    r = _sampler(ref)
    r.update_with_all_losses(batch["ts"], batch["losses"])
    assert s.state_dict() == r.state_dict()


def test_named_samplers():
    d = types.SimpleNamespace(num_timesteps=7)
    assert isinstance(create_named_schedule_sampler("uniform", d), UniformSampler)
    assert isinstance(create_named_schedule_sampler("loss-second-moment", d), LossSecondMomentResampler)
    with pytest.raises(ValueError, match="unknown schedule sampler 'importance'; choose one of uniform"):
        create_named_schedule_sampler("importance", d)
    t, w = create_named_schedule_sampler("uniform", d).sample(5, "cpu")
    assert t.dtype == torch.int64 and (w == 1).all() and ((t >= 0) & (t < 7)).all()
