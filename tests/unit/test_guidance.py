"""Classifier-free guidance: label dropout (rate, seeding, the trainer hook), the model layout, the guidance wrapper
(formula, W = 1 and W = 0 exactly), its wiring through ``api.sample`` / ``api.upsample`` / ``api.nll`` and the
one-line refusals."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import random_weights

from iddpm import api
from iddpm.build import build_model, guidance_capable, null_label
from iddpm.checkpoints.model_file import save_model_file
from iddpm.config import ConfigError, RunConfig, apply_overrides, preset
from iddpm.diffusion import classifier_free_guidance
from iddpm.diffusion.guidance import GuidedModel, NullLabelModel
from iddpm.sample import generate
from iddpm.train.draws import drop_labels, global_positions, label_dropout_mask
from iddpm.train.trainer import Trainer

TINY = dict(image_size=8, in_channels=1, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="4", num_heads=2, learn_sigma=True, diffusion_steps=20, noise_schedule="cosine")


def tiny(**kw) -> RunConfig:
    return apply_overrides(RunConfig(), dict(TINY, **kw)).validate()


@pytest.fixture(scope="module")
def guided_file(tmp_path_factory):
    """A class-conditional model file trained (here: random weights) with label dropout 0.1."""
    cfg = tiny(class_cond=True, num_classes=10, class_dropout=0.1)
    return save_model_file(tmp_path_factory.mktemp("cfg") / "guided.safetensors", random_weights(cfg, 1), cfg)


# --------------------------------------------------------------------------------------------------------------------
# config and model layout
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, message", [
    (1.0, "--class_dropout 1.0: must be in [0, 1)"),
    (-0.1, "--class_dropout -0.1: must be in [0, 1)"),
    (math.nan, "--class_dropout nan: must be a finite number"),
])
def test_class_dropout_range(value, message):
    with pytest.raises(ConfigError, match=r"^" + message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        tiny(class_cond=True, num_classes=10, class_dropout=value)


def test_class_dropout_needs_class_cond():
    with pytest.raises(ConfigError, match=r"^--class_dropout 0.1: needs --class_cond True"):
        tiny(class_dropout=0.1)


def test_null_row_only_with_dropout():
    plain, dropped = tiny(class_cond=True, num_classes=10), tiny(class_cond=True, num_classes=10, class_dropout=0.2)
    assert build_model(plain).label_emb.weight.shape[0] == 10 and not guidance_capable(plain)
    assert build_model(dropped).label_emb.weight.shape[0] == 11 and guidance_capable(dropped)
    assert null_label(dropped) == 10
    with pytest.raises(ConfigError, match="null label: the model has none"):
        null_label(plain)


def test_dropout_free_model_keeps_released_layout(reference_dir):
    """imagenet64_cond with class_dropout 0 is the released state_dict (keys, order, shapes): it loads strictly; the
    dropout model differs only in the label embedding's extra row."""
    ref = json.loads((reference_dir / "unet_keys.json").read_text())["imagenet64_cond"]["state_dict"]
    cfg = preset("imagenet64_cond")
    assert cfg.model.class_dropout == 0.0
    with torch.device("meta"):
        plain = build_model(cfg)
        dropped = build_model(cfg.replace(model=dataclasses.replace(cfg.model, class_dropout=0.1)))
    assert [[k, list(v.shape)] for k, v in plain.state_dict().items()] == ref
    got = [[k, list(v.shape)] for k, v in dropped.state_dict().items()]
    diff = [(a, b) for a, b in zip(ref, got, strict=True) if a != b]
    assert diff == [(["label_emb.weight", [1000, 768]], ["label_emb.weight", [1001, 768]])]


def test_strict_load_of_dropout_free_checkpoint():
    plain = tiny(class_cond=True, num_classes=10)
    state = random_weights(plain)
    build_model(plain).load_state_dict(state, strict=True)
    with pytest.raises(RuntimeError, match="label_emb.weight"):
        build_model(dataclasses.replace(plain, model=dataclasses.replace(plain.model, class_dropout=0.1))) \
            .load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------------------------------
# label dropout draws
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_rate_within_binomial_error(p):
    n = 8000
    masks = [label_dropout_mask(7, step, range(n // 4), p) for step in range(4)]
    rate = float(torch.cat(masks).double().mean())
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n), rate
    assert not all(torch.equal(masks[0], m) for m in masks[1:])  # steps draw afresh


def test_dropout_is_a_pure_function_of_seed_step_position():
    full = label_dropout_mask(3, 11, range(64), 0.3)
    assert torch.equal(full, label_dropout_mask(3, 11, range(64), 0.3))  # same seed -> same labels (resume)
    assert not torch.equal(full, label_dropout_mask(4, 11, range(64), 0.3))
    assert not torch.equal(full, label_dropout_mask(3, 12, range(64), 0.3))
    for world in (2, 4):  # the interleaved ranks of a world together draw what one process draws
        for rank in range(world):
            pos = global_positions(64 // world, rank, world)
            assert torch.equal(label_dropout_mask(3, 11, pos, 0.3), full[pos])
    # the draws are nested in p: a larger probability drops a superset
    assert bool((full <= label_dropout_mask(3, 11, range(64), 0.6)).all())


def test_drop_labels():
    y = torch.arange(40) % 10
    assert drop_labels(y, 0, 5, range(40), 0.0, 10) is y  # no dropout: no draws, the labels untouched
    out = drop_labels(y, 0, 5, range(40), 0.5, 10)
    mask = label_dropout_mask(0, 5, range(40), 0.5)
    assert torch.equal(out[mask], torch.full((int(mask.sum()),), 10)) and torch.equal(out[~mask], y[~mask])
    assert 0 < int(mask.sum()) < 40


def _fake_trainer(cfg, step, rank=0, world_size=1):
    return SimpleNamespace(cfg=cfg, tcfg=cfg.train, step=step, device=torch.device("cpu"),
                           dist=SimpleNamespace(rank=rank, world_size=world_size))


def test_trainer_hook_drops_by_step_and_global_position():
    """The trainer's model inputs: labels dropped by (seed, step, global position), so a resumed run (its step
    restored) and 1 vs 2 processes see the same labels."""
    cfg = tiny(class_cond=True, num_classes=10, class_dropout=0.4, seed=5)
    x, y = torch.zeros(16, 1, 8, 8), torch.arange(16) % 10
    one = Trainer._model_kwargs(_fake_trainer(cfg, 9), x, {"y": y})["y"]
    assert torch.equal(one, drop_labels(y, 5, 9, range(16), 0.4, 10)) and bool((one == 10).any())
    two = torch.empty_like(one)
    for rank in range(2):  # rank r holds global positions r, r + 2, ... (the loader's interleaving)
        two[rank::2] = Trainer._model_kwargs(_fake_trainer(cfg, 9, rank, 2), x[rank::2], {"y": y[rank::2]})["y"]
    assert torch.equal(one, two)
    plain = tiny(class_cond=True, num_classes=10)
    assert torch.equal(Trainer._model_kwargs(_fake_trainer(plain, 9), x, {"y": y})["y"], y)


# --------------------------------------------------------------------------------------------------------------------
# the wrapper
# --------------------------------------------------------------------------------------------------------------------
class Toy:
    """A 'network' whose output depends on x, t, y and low_res elementwise; records its batch sizes."""

    def __init__(self, learned_sigma: bool):
        self.learned_sigma, self.calls = learned_sigma, []

    def __call__(self, x, t, y, low_res=None):
        self.calls.append(x.shape[0])
        col = (-1, 1, 1, 1)
        mean = x * (1 + y.view(*col).float()) + torch.sin(t.view(*col).float()) + y.view(*col).float() ** 2
        if low_res is not None:
            mean = mean + low_res
        return torch.cat([mean, 0.3 * mean - y.view(*col).float()], 1) if self.learned_sigma else mean


@pytest.mark.parametrize("learned_sigma", [True, False])
@pytest.mark.parametrize("scale", [0.5, 2.0, 5.0])
def test_guided_output_is_the_formula(learned_sigma, scale):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(5, 3, 4, 4, generator=g), torch.tensor([0, 3, 7, 9, 2])
    y, low = torch.tensor([1, 0, 2, 2, 1]), torch.randn(5, 3, 4, 4, generator=g)
    toy = Toy(learned_sigma)
    guided = classifier_free_guidance(toy, scale, 3, learned_sigma=learned_sigma)
    assert isinstance(guided, GuidedModel)
    out = guided(x, t, y=y, low_res=low)
    assert toy.calls == [10]  # one batched forward of 2N
    cond, uncond = toy(x, t, y, low), toy(x, t, torch.full_like(y, 3), low)
    want = uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3])
    if learned_sigma:
        want = torch.cat([want, cond[:, 3:]], 1)  # the variance channels from the conditional branch
    assert torch.equal(out, want)


def test_scale_one_is_the_model_and_zero_the_null_label():
    toy = Toy(True)
    assert classifier_free_guidance(toy, 1.0, 3, learned_sigma=True) is toy
    uncond = classifier_free_guidance(toy, 0.0, 3, learned_sigma=True)
    assert isinstance(uncond, NullLabelModel)
    x, t, y = torch.randn(4, 2, 4, 4), torch.arange(4), torch.tensor([0, 1, 2, 0])
    assert torch.equal(uncond(x, t, y=y), toy(x, t, torch.full_like(y, 3)))
    assert toy.calls[-2:] == [4, 4]  # no doubled batch at W = 0
    with pytest.raises(ValueError, match="needs the class labels y"):
        classifier_free_guidance(toy, 2.0, 3, learned_sigma=True)(x, t)
    with pytest.raises(ValueError, match="must be finite"):
        classifier_free_guidance(toy, math.inf, 3, learned_sigma=True)


def test_wrong_channel_count_is_named():
    guided = classifier_free_guidance(Toy(False), 2.0, 3, learned_sigma=True)
    with pytest.raises(ValueError, match=r"expected 4 channels \(learned variance\)"):
        guided(torch.zeros(2, 2, 4, 4), torch.zeros(2), y=torch.zeros(2, dtype=torch.long))


# --------------------------------------------------------------------------------------------------------------------
# through the API
# --------------------------------------------------------------------------------------------------------------------
def _sample(run, **kw):
    kw = dict(num_samples=6, batch_size=6, timestep_respacing="5", fast=False, device="cpu", seed=2, **kw)
    return api.sample(run, **kw)


def test_scale_one_is_unguided_sampling_bit_for_bit(guided_file):
    model, diffusion, cfg = api.load_run(guided_file, device="cpu", timestep_respacing="5")
    plain = generate(model, diffusion, num_samples=6, batch_size=6, image_shape=(1, 8, 8), seed=2,
                     classes="balanced", num_classes=10, progress=False, return_float=True)
    got = _sample(guided_file, guidance_scale=1.0, classes="balanced", return_float=True)
    assert np.array_equal(got.samples, plain.samples) and np.array_equal(got.images, plain.images)
    assert got.info["guidance_scale"] == 1.0


def test_scale_zero_is_null_label_sampling(guided_file):
    model, diffusion, _ = api.load_run(guided_file, device="cpu", timestep_respacing="5")
    null = generate(model, diffusion, num_samples=6, batch_size=6, image_shape=(1, 8, 8), seed=2, classes=10,
                    num_classes=11, progress=False, return_float=True)
    got = _sample(guided_file, guidance_scale=0.0, classes=3, return_float=True)
    assert np.array_equal(got.samples, null.samples)
    assert got.labels.tolist() == [3] * 6  # the requested labels are recorded, not the null label


@pytest.mark.parametrize("use_ddim", [False, True])
def test_every_sampler_gets_the_wrapped_model(guided_file, use_ddim):
    model, diffusion, _ = api.load_run(guided_file, device="cpu", timestep_respacing="5")
    wrapped = classifier_free_guidance(model, 3.0, 10, learned_sigma=True)
    want = generate(wrapped, diffusion, num_samples=6, batch_size=6, image_shape=(1, 8, 8), seed=2,
                    classes="balanced", num_classes=10, use_ddim=use_ddim, progress=False, return_float=True)
    got = _sample(guided_file, guidance_scale=3.0, classes="balanced", use_ddim=use_ddim, return_float=True)
    plain = _sample(guided_file, classes="balanced", use_ddim=use_ddim, return_float=True)
    assert np.array_equal(got.samples, want.samples)
    assert not np.allclose(got.samples, plain.samples)
    assert got.info["guidance_scale"] == 3.0


def test_upsample_duplicates_low_res(tmp_path):
    cfg = tiny(class_cond=True, num_classes=4, class_dropout=0.1, small_size=4)
    path = save_model_file(tmp_path / "sr.safetensors", random_weights(cfg, 2), cfg)
    base = (np.arange(3 * 4 * 4).reshape(3, 4, 4, 1) * 5 % 256).astype(np.uint8)
    kw = dict(timestep_respacing="4", fast=False, device="cpu", batch_size=3)
    got = api.upsample(path, (base, np.array([0, 1, 3])), guidance_scale=2.0, **kw)
    plain = api.upsample(path, (base, np.array([0, 1, 3])), **kw)
    assert got.images.shape == (3, 8, 8, 1) and got.info["guidance_scale"] == 2.0
    assert not np.array_equal(got.images, plain.images)


def test_refusals(tmp_path, guided_file):
    plain = tiny(class_cond=True, num_classes=10)
    plain_file = save_model_file(tmp_path / "plain.safetensors", random_weights(plain), plain)
    uncond = tiny()
    uncond_file = save_model_file(tmp_path / "uncond.safetensors", random_weights(uncond), uncond)
    with pytest.raises(ConfigError, match=r"^--guidance_scale 2: the model was trained without label dropout "
                                          r"\(--class_dropout 0\), so it has no unconditional branch") as exc:
        _sample(plain_file, guidance_scale=2.0)
    assert "\n" not in str(exc.value)  # one line
    with pytest.raises(ConfigError, match=r"^--guidance_scale 0: the model is unconditional"):
        _sample(uncond_file, guidance_scale=0.0)
    with pytest.raises(ConfigError, match=r"^--guidance_scale -1: must be >= 0"):
        _sample(guided_file, guidance_scale=-1.0)
    with pytest.raises(ConfigError, match=r"^--guidance_scale nan: must be a finite number"):
        _sample(guided_file, guidance_scale=math.nan)
    _sample(plain_file, guidance_scale=1.0)  # W = 1 is always fine


def test_nll_is_conditional_and_says_so(guided_file):
    lines = []
    data = [(torch.rand(2, 1, 8, 8) * 2 - 1, {"y": torch.tensor([3, 7])})]
    result = api.nll(guided_file, data=data, device="cpu", fast=False, log=lines.append)
    assert np.isfinite(result.bpd)
    assert any("NLL conditional on the true labels (guidance_scale does not apply" in s for s in lines), lines
