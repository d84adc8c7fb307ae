"""Building blocks of the trainer: lr schedule, EMA, precision policy, metric meter, per-example draws."""

import math

import pytest
import torch

from iddpm.diffusion import LossSecondMomentResampler, UniformSampler, create_gaussian_diffusion
from iddpm.train import EMA, Precision, lr_at
from iddpm.train.draws import example_draws, global_positions
from iddpm.train.meter import MetricMeter


def test_lr_schedule():
    assert lr_at(0, 1e-3) == lr_at(10**6, 1e-3) == 1e-3
    # the original's anneal: lr * (1 - step / anneal_steps)
    assert lr_at(0, 1.0, anneal_steps=4) == 1.0
    assert lr_at(3, 1.0, anneal_steps=4) == 0.25
    assert lr_at(4, 1.0, anneal_steps=4) == 0.0
    assert [lr_at(s, 1.0, warmup_steps=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_at(1, 1.0, anneal_steps=4, warmup_steps=2) == pytest.approx(0.75)


def test_ema_update_matches_the_formula():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    ema = EMA(m, (0.9, 0.5))
    start = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update(m)
    for i, r in enumerate((0.9, 0.5)):
        sd = ema.state_dict(m, i)
        for k in start:
            expected = start[k].clone().mul_(r).add_(start[k] + 1.0, alpha=1 - r)
            assert torch.equal(sd[k], expected)
    other = torch.nn.Linear(3, 2)
    ema.copy_to(other, 1)
    assert torch.equal(other.weight, ema.state_dict(m, 1)["weight"])
    ema2 = EMA(m, (0.9,))
    ema2.load_state_dict(0, ema.state_dict(m, 0))
    assert torch.equal(ema2.shadows[0][0], ema.shadows[0][0])
    with pytest.raises(KeyError):
        ema2.load_state_dict(0, {})


def test_fp16_scaling_skips_overflowing_steps_and_bf16_autocasts():
    m = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    p = Precision("fp16", torch.device("cpu"), fp16_scale_growth=0.5)
    assert p.loss_scale() == 2.0**20
    w = m.weight.detach().clone()
    with p.autocast():
        y = m(torch.randn(4, 3))
    assert y.dtype == torch.float16
    p.scale(y.float().mean() * float("inf")).backward()
    p.unscale_(opt)
    assert p.step(opt) is False and torch.equal(w, m.weight)
    assert p.loss_scale() == 2.0**19
    state = p.state_dict()
    q = Precision("fp16", torch.device("cpu"))
    q.load_state_dict(state)
    assert q.loss_scale() == 2.0**19
    b = Precision("bf16", torch.device("cpu"))
    with b.autocast():
        assert m(torch.randn(2, 3)).dtype == torch.bfloat16
    f = Precision("fp32", torch.device("cpu"))
    assert f.loss_scale() == 1.0 and f.state_dict() == {}
    with f.autocast():
        assert m(torch.randn(2, 3)).dtype == torch.float32


def test_meter_quartiles_like_the_original():
    meter = MetricMeter()
    t = torch.tensor([0, 24, 25, 99, 50])
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    meter.add_losses(100, t, {"loss": loss})
    meter.add_losses(100, torch.tensor([0]), {"loss": torch.tensor([7.0])})
    meter.add("grad_norm", 2.0)
    meter.add("grad_norm", 4.0)
    out = meter.means()
    assert out["loss"] == pytest.approx((3.0 + 7.0) / 2)  # mean of per-call means
    assert out["loss_q0"] == pytest.approx((1 + 2 + 7) / 3)
    assert out["loss_q1"] == 3.0 and out["loss_q2"] == 5.0 and out["loss_q3"] == 4.0
    assert out["grad_norm"] == 3.0
    meter.reset()
    assert meter.means() == {}


@pytest.mark.parametrize("sampler_cls", [UniformSampler, LossSecondMomentResampler])
def test_draws_do_not_depend_on_batch_split(sampler_cls):
    diffusion = create_gaussian_diffusion(steps=50, noise_schedule="cosine")
    sampler = sampler_cls(diffusion)
    full = example_draws(sampler, 3, 11, list(range(8)), (1, 4, 4), torch.device("cpu"))
    parts = [example_draws(sampler, 3, 11, list(r), (1, 4, 4), torch.device("cpu")) for r in (range(5), range(5, 8))]
    for a, b0, b1 in zip(full, *parts):
        assert torch.equal(a, torch.cat([b0, b1]))
    assert full[0].dtype == torch.int64 and full[1].dtype == torch.float32 and full[2].shape == (8, 1, 4, 4)
    other = example_draws(sampler, 3, 12, list(range(8)), (1, 4, 4), torch.device("cpu"))
    assert not torch.equal(full[2], other[2])


def test_global_positions_interleave_like_distributed_sampler():
    assert global_positions(3, 0, 1) == [0, 1, 2]
    assert global_positions(3, 1, 2) == [1, 3, 5]
    both = sorted(global_positions(4, 0, 2) + global_positions(4, 1, 2))
    assert both == list(range(8))
    assert math.isclose(sum(global_positions(2, 2, 3)), 2 + 5)
