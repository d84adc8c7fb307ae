"""Trainer semantics on a tiny convolution: micro-batch gradients are summed like the original's, the step
counter / lr anneal / EMA follow the optimizer steps, and a NaN loss stops with the step and timesteps."""

import dataclasses

import pytest
import torch

from iddpm.config import RunConfig, TrainConfig
from iddpm.diffusion import UniformSampler, create_gaussian_diffusion
from iddpm.runtime import DistContext
from iddpm.train import NonFiniteLossError, Trainer


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t, **kwargs):
        return self.conv(x) + 0.0 * t.float().view(-1, 1, 1, 1)


def _trainer(**train):
    torch.manual_seed(0)
    model = Tiny()
    diffusion = create_gaussian_diffusion(steps=20, noise_schedule="cosine")
    cfg = RunConfig(train=TrainConfig(**{"batch_size": 4, "lr": 1e-2, "ema_rate": "0.5", **train}))
    return Trainer(model=model, diffusion=diffusion, data=[], schedule_sampler=UniformSampler(diffusion),
                   dist=DistContext(), cfg=cfg, progress=False)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(4, 1, 6, 6, generator=g) * 2 - 1, {}


def test_microbatch_gradients_are_summed_like_the_original():
    full, micro = _trainer(), _trainer(microbatch=2)
    full.train_step(*_batch())
    micro.train_step(*_batch())
    for a, b in zip(full.model.parameters(), micro.model.parameters()):
        # same examples, timesteps and noise; two micro-batch means summed = 2 x the full-batch mean
        assert torch.allclose(b.grad, 2 * a.grad, rtol=1e-5, atol=1e-7)


def test_step_lr_and_ema_follow_optimizer_steps():
    tr = _trainer(lr_anneal_steps=4)
    start = [p.detach().clone() for p in tr.model.parameters()]
    out = tr.train_step(*_batch())
    assert out["stepped"] and tr.step == 1 and tr.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
    tr.train_step(*_batch())
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * (1 - 1 / 4))
    # EMA after two updates with rate 0.5: 0.25 * start + 0.25 * p1 + 0.5 * p2 != p2, != start
    ema = tr.ema.state_dict(tr.model, 0)
    assert not torch.equal(ema["conv.weight"], tr.model.conv.weight)
    assert not torch.equal(ema["conv.weight"], start[0])
    m = tr.meter.means()
    assert m["lr"] > 0 and m["grad_norm"] > 0 and "loss" in m and "mse" in m


def test_non_finite_loss_names_step_and_timesteps():
    tr = _trainer()
    with torch.no_grad():
        tr.model.conv.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 1 \(timesteps \[\d+"):
        tr.train_step(*_batch())
    assert tr.step == 0


def test_training_state_is_json_able():
    import json

    tr = _trainer(precision="fp16")
    tr.train_step(*_batch())
    state = tr.training_state()
    json.dumps(state)
    assert state["precision"] == "fp16" and state["scaler"]["scale"] > 0 and len(state["rng"]) == 1
    assert dataclasses.is_dataclass(tr.cfg)
