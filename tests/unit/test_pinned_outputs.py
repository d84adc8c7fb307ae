"""Values pinned before the layering renovation (issue 10), so that moving code never changes what a seed gives.

The numbers were produced by the code before the renovation (commit 3ffd65d) and reproduced bit for bit after it
on the same machine (an Intel Xeon with AVX-512/AMX).  Across CPUs the float32 network rounds differently in the
last bits, so the tolerances are set to what round-off can move, far below what any change of algorithm moves
(a wrong noise draw, step, weight or timestep changes these values by 1e-2 or more):
- samples: 10 (ancestral) / 5 (DDIM) float32 steps of a tiny U-Net; round-off of ~1e-6 per step, amplified by at
  most the step count and the clamp at +-1 -> atol 1e-4;
- NLL: float64 sums of float32 terms -> rtol 1e-5;
- training: 3 AdamW steps at lr 1e-3; round-off can flip the sign of an update whose gradient is ~0, moving one
  weight by <= 2 lr, so the norm (sum of squares of ~10^5 weights) stays within 1e-6 relative and the L1 sum
  within a few lr -> rtol 1e-6 / atol 0.05.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TINY_TRAIN_FLAGS, random_weights, tiny_cfg
from safetensors.torch import load_file

from iddpm import api
from iddpm.build import build_model, build_sampling_diffusion
from iddpm.cli.main import main

ANCESTRAL_10 = [
    [0.14075492322444916, -0.768081545829773, -1.0, -0.9815593957901001, -0.04179393872618675, -0.7792055606842041],
    [0.7045480608940125, 0.5667427182197571, -0.8460294604301453, 1.0, 0.39382094144821167, 0.6012980937957764],
    [-1.0, 0.02539382129907608, -0.713189959526062, -1.0, 0.4905780851840973, -1.0],
    [-0.19436056911945343, -1.0, -0.028059525415301323, -0.05951163172721863, -1.0, -0.2631722092628479],
]
DDIM_5 = [
    [-0.9669808149337769, -1.0, -0.9869582653045654, -1.0, 1.0, 0.9870882630348206],
    [-1.0, 1.0, 0.8546252846717834, 0.2601369619369507, 1.0, 1.0],
    [-0.7766677141189575, -0.9833059906959534, 1.0, -0.582516610622406, 1.0, 0.3906533718109131],
    [-1.0, -0.8775003552436829, -0.7964092493057251, -1.0, -1.0, 0.7305346131324768],
]
NLL_BPD = 14.164285977681478
NLL_VB_FIRST = [4.192838152249654, 5.775209903717041, 1.9239962498346965]
TRAIN_NORM, TRAIN_L1 = 46.64551907679756, 17970.720589508015


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    cfg = tiny_cfg()
    model = build_model(cfg)
    model.load_state_dict(random_weights(cfg, 3))
    return model.eval(), cfg


@pytest.mark.parametrize("respacing,use_ddim,expected", [("10", False, ANCESTRAL_10), ("ddim5", True, DDIM_5)])
def test_samples_pinned(tiny, respacing, use_ddim, expected):
    model, cfg = tiny
    r = api.sample(model=model, diffusion=build_sampling_diffusion(cfg, respacing), cfg=cfg, num_samples=4,
                   batch_size=4, seed=11, return_float=True, use_ddim=use_ddim, fast=False)
    np.testing.assert_allclose(r.samples.reshape(4, -1)[:, :6], expected, rtol=0, atol=1e-4)


def test_nll_pinned(tiny):
    model, cfg = tiny
    n = api.nll(model=model, diffusion=build_sampling_diffusion(cfg, "10"), cfg=cfg, num_examples=6, batch_size=6,
                seed=2, fast=False)
    assert n.bpd == pytest.approx(NLL_BPD, rel=1e-5)
    np.testing.assert_allclose(n.vb_per_t[:3], NLL_VB_FIRST, rtol=1e-5)


def test_training_weights_pinned(tmp_path):
    flags = [*TINY_TRAIN_FLAGS, "--in_channels", "1", "--learn_sigma", "True", "--batch_size", "8", "--lr", "1e-3",
             "--max_steps", "3", "--run_dir", str(tmp_path / "r")]
    assert main(["train", *flags]) == 0
    sd = load_file(str(tmp_path / "r" / "checkpoints" / "step_00000003" / "model.safetensors"))
    w = torch.cat([v.flatten().double() for _, v in sorted(sd.items())])
    assert float(w.norm()) == pytest.approx(TRAIN_NORM, rel=1e-6)
    assert float(w.abs().sum()) == pytest.approx(TRAIN_L1, abs=0.05)
