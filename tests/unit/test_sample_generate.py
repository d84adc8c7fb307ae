"""generate(): batch-size invariance of seeds, labels, x_T, DDIM determinism, trajectories."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_same_images, random_weights, tiny_cfg, toy_model

from iddpm.config import ConfigError
from iddpm.diffusion import create_gaussian_diffusion
from iddpm.sample import (
    PerSampleNoise,
    gather_results,
    generate,
    resolve_labels,
    sample_seed,
    trajectory_frame_steps,
)

SHAPE = (3, 4, 4)


@pytest.fixture(scope="module")
def diffusion():
    return create_gaussian_diffusion(steps=12, noise_schedule="cosine", rescale_timesteps=True)


def run(diffusion, **kw):
    args = dict(num_samples=5, batch_size=5, image_shape=SHAPE, seed=3, progress=False, return_float=True)
    args.update(kw)
    return generate(toy_model, diffusion, **args)


@pytest.mark.parametrize("use_ddim,eta", [(False, 0.0), (True, 0.0), (True, 0.7)])
def test_same_seed_same_images_whatever_the_batch_size(diffusion, use_ddim, eta):
    ref = run(diffusion, batch_size=5, use_ddim=use_ddim, eta=eta)
    for bs in (1, 2, 4):
        got = run(diffusion, batch_size=bs, use_ddim=use_ddim, eta=eta)
        np.testing.assert_array_equal(got.images, ref.images)
        np.testing.assert_allclose(got.samples, ref.samples, rtol=0, atol=1e-6)


def test_prefix_of_a_larger_run_is_identical(diffusion):
    small = run(diffusion, num_samples=3, batch_size=2)
    big = run(diffusion, num_samples=5, batch_size=3)
    np.testing.assert_array_equal(small.images, big.images[:3])


def test_different_seeds_differ(diffusion):
    a, b = run(diffusion, seed=0), run(diffusion, seed=1)
    assert not np.array_equal(a.samples, b.samples)
    # and samples within a run are different from each other
    assert not np.allclose(a.samples[0], a.samples[1])


def test_sample_seeds_are_distinct_and_stable():
    seeds = {sample_seed(s, i) for s in range(4) for i in range(50)}
    assert len(seeds) == 200
    assert sample_seed(7, 3) == sample_seed(7, 3)
    assert 0 <= sample_seed(2**40, 10**9) < 2**63


def test_per_sample_noise_rows_are_independent_of_grouping():
    both = PerSampleNoise(5, [0, 1], (2, 3))
    only1 = PerSampleNoise(5, [1], (2, 3))
    first_both, first_only = both.draw(), only1.draw()
    np.testing.assert_array_equal(first_both[1].numpy(), first_only[0].numpy())
    np.testing.assert_array_equal(both.draw()[1].numpy(), only1.draw()[0].numpy())
    assert first_both.dtype == torch.float32 and first_both.shape == (2, 2, 3)


def test_x_T_is_used(diffusion):
    x_T = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(9))
    a = run(diffusion, x_T=x_T, use_ddim=True, seed=0)
    b = run(diffusion, x_T=x_T, use_ddim=True, seed=1)  # eta 0: only x_T matters
    np.testing.assert_allclose(a.samples, b.samples, atol=1e-6)
    c = run(diffusion, use_ddim=True, seed=0)
    assert not np.allclose(a.samples, c.samples)
    with pytest.raises(ValueError, match="x_T shape"):
        run(diffusion, x_T=x_T[:2])


def test_ddim_eta0_matches_the_diffusion_loop(diffusion):
    x_T = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(4))
    ours = run(diffusion, x_T=x_T, use_ddim=True, batch_size=2)
    loop = diffusion.ddim_sample_loop(toy_model, (5, *SHAPE), noise=x_T, clip_denoised=True, eta=0.0)
    np.testing.assert_allclose(ours.samples, loop.numpy(), atol=1e-6)


def test_ancestral_matches_the_diffusion_loop_with_the_same_noise(diffusion):
    # generate's draws for a single batch: x_T then one per step, row i from sample i's stream
    streams = PerSampleNoise(3, range(5), SHAPE)
    x_T = streams.draw()
    steps = [streams.draw() for _ in range(diffusion.num_timesteps)]
    loop = diffusion.p_sample_loop(toy_model, (5, *SHAPE), noise=x_T, clip_denoised=True, step_noise=steps)
    ours = run(diffusion, batch_size=2)
    np.testing.assert_allclose(ours.samples, loop.numpy(), atol=1e-6)


def test_labels_are_passed_and_returned(diffusion):
    bal = run(diffusion, num_samples=7, batch_size=3, classes="balanced", num_classes=3)
    np.testing.assert_array_equal(bal.labels, [0, 1, 2, 0, 1, 2, 0])
    fixed = run(diffusion, num_samples=7, classes=2, num_classes=3)
    np.testing.assert_array_equal(fixed.labels, [2] * 7)
    assert not np.allclose(bal.samples[1], fixed.samples[1])  # y reaches the model
    np.testing.assert_allclose(bal.samples[2], fixed.samples[2], atol=1e-6)  # same label, same stream


def test_resolve_labels():
    rnd = resolve_labels(None, 20, 10, seed=1)
    assert rnd.dtype == np.int64 and rnd.shape == (20,) and rnd.min() >= 0 and rnd.max() < 10
    np.testing.assert_array_equal(rnd, resolve_labels(None, 20, 10, seed=1))
    np.testing.assert_array_equal(resolve_labels([3, 1], 2, 5), [3, 1])
    assert resolve_labels(None, 4, None) is None
    with pytest.raises(ConfigError, match="out of range"):
        resolve_labels(10, 4, 10)
    with pytest.raises(ConfigError, match="not class-conditional"):
        resolve_labels("balanced", 4, None)
    with pytest.raises(ConfigError, match="3 labels for 4"):
        resolve_labels([1, 2, 3], 4, 10)


def test_model_kwargs_fn_gets_global_indices(diffusion):
    low = torch.linspace(-1, 1, 5).reshape(5, 1, 1, 1).expand(5, 3, 2, 2).contiguous()
    seen = []

    def fn(idx):
        seen.append(idx.tolist())
        return {"low_res": low[torch.from_numpy(idx)]}

    a = run(diffusion, batch_size=2, model_kwargs_fn=fn)
    assert seen == [[0, 1], [2, 3], [4]]
    b = run(diffusion, batch_size=5, model_kwargs_fn=fn)
    np.testing.assert_allclose(a.samples, b.samples, atol=1e-6)


def test_trajectory(diffusion):
    res = run(diffusion, batch_size=2, return_trajectory=True, trajectory_samples=3, trajectory_frames=4)
    assert res.trajectory.dtype == np.uint8
    assert res.trajectory.shape == (len(res.trajectory_steps), 3, 4, 4, 3)
    assert res.trajectory_steps[0] == diffusion.num_timesteps and res.trajectory_steps[-1] == 0
    np.testing.assert_array_equal(res.trajectory[-1], res.images[:3])
    assert trajectory_frame_steps(100, 5) == [100, 75, 50, 25, 0]
    assert trajectory_frame_steps(3, 10) == [3, 2, 1, 0]


def test_tiny_unet_batch_invariance():
    """A real (tiny) U-Net: batch 2 vs 4 gives the same images up to the network's float round-off."""
    from iddpm.build import build_model

    cfg = tiny_cfg(diffusion_steps=10)
    model = build_model(cfg)
    model.load_state_dict(random_weights(cfg))  # outputs depend on the input
    model.eval()
    diff = create_gaussian_diffusion(steps=10, learn_sigma=True, noise_schedule="cosine", rescale_timesteps=True)
    kw = dict(num_samples=4, image_shape=(1, 8, 8), seed=11, progress=False, return_float=True)
    a = generate(model, diff, batch_size=2, **kw)
    b = generate(model, diff, batch_size=4, **kw)
    assert a.images.shape == (4, 8, 8, 1)
    np.testing.assert_allclose(a.samples, b.samples, rtol=0, atol=1e-4)  # same noise; network round-off only
    assert_same_images(a.images, b.images)


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_shares_gather_to_the_single_process_result(diffusion, world_size):
    kw = dict(num_samples=7, batch_size=2, classes="balanced", num_classes=3, return_trajectory=True,
              trajectory_samples=5, trajectory_frames=3)
    single = run(diffusion, **kw)
    parts = [run(diffusion, rank=r, world_size=world_size, **kw) for r in range(world_size)]
    assert sum(p.images.shape[0] for p in parts) == 7
    assert parts[1].indices.tolist()[:2] == [2, 3]  # batch 1 runs on rank 1
    merged = gather_results(parts[::-1])  # order of the shares does not matter
    np.testing.assert_array_equal(merged.indices, np.arange(7))
    np.testing.assert_array_equal(merged.images, single.images)
    np.testing.assert_array_equal(merged.labels, single.labels)
    np.testing.assert_array_equal(merged.samples, single.samples)
    np.testing.assert_array_equal(merged.trajectory, single.trajectory)
    assert merged.trajectory_steps == single.trajectory_steps
    with pytest.raises(ValueError, match="rank 3"):
        run(diffusion, rank=3, world_size=3)


def test_result_grid_and_save(diffusion, tmp_path):
    res = run(diffusion, num_samples=3, classes="balanced", num_classes=3)
    img = res.grid(scale=1, nrow=3)
    assert img.size == (2 + 3 * 6, 2 + 6) and img.mode == "RGB"
    path = res.save(tmp_path)
    assert path.name == "samples_3x4x4x3.npz" and (tmp_path / "grid.png").is_file()
    with np.load(path) as z:
        np.testing.assert_array_equal(z["arr_0"], res.images)
        np.testing.assert_array_equal(z["arr_1"], [0, 1, 2])
