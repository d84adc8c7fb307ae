"""Sample quality measured while training, the parts below a whole run: the cached reference statistics (reused,
invalidated), the metrics against them (FID of the training data against its own statistics ~ 0, the bootstrap
standard error), the evaluation time kept out of --max_minutes, and one-line refusals of bad settings at start."""

import itertools
import time

import numpy as np
import pytest
import torch
from PIL import Image

from iddpm.cli.main import main
from iddpm.config import DataConfig, RunConfig, TrainConfig
from iddpm.data.digits import load_digits_split
from iddpm.diffusion import UniformSampler, create_gaussian_diffusion
from iddpm.eval import reference as reference_mod
from iddpm.eval.evaluate import compute_stats
from iddpm.eval.features import DigitsExtractor, RandomProjectionExtractor
from iddpm.eval.metrics import frechet_distance, is_stats_file, load_stats
from iddpm.eval.reference import REF_FILE, bootstrap_fid_se, load_or_compute_reference
from iddpm.runtime import DistContext
from iddpm.train import Trainer

SHAPE = (8, 8, 1)


def _spy_compute(monkeypatch):
    calls = []
    real = reference_mod._compute

    def spy(images, extractor, log):
        calls.append(len(images))
        return real(images, extractor, log)

    monkeypatch.setattr(reference_mod, "_compute", spy)
    return calls


def test_reference_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    calls = _spy_compute(monkeypatch)
    ext = RandomProjectionExtractor(dim=8)
    data = DataConfig()
    first = load_or_compute_reference(tmp_path, "digits-test", data, SHAPE, ext)
    assert calls == [360] and not first.reused and first.meta["source"] == "digits-test"
    assert is_stats_file(tmp_path / REF_FILE)  # also a statistics file of `iddpm eval`
    again = load_or_compute_reference(tmp_path, "digits-test", data, SHAPE, ext)  # e.g. on --resume
    assert calls == [360] and again.reused
    assert np.array_equal(again.stats.mu, first.stats.mu) and np.array_equal(again.stats.sigma, first.stats.sigma)
    load_or_compute_reference(tmp_path, "", data, SHAPE, ext)  # another source: the training digits
    assert calls == [360, 1437]
    load_or_compute_reference(tmp_path, "", data, SHAPE, RandomProjectionExtractor(dim=6))  # another extractor
    assert calls == [360, 1437, 1437]
    assert load_stats(tmp_path / REF_FILE).extractor == "random-projection-6-seed0"
    # a folder: recomputed when a file's content changes (size / mtime), reused otherwise
    folder = tmp_path / "ref"
    folder.mkdir()
    images = load_digits_split("test")[0][:12]
    for i, a in enumerate(images):
        Image.fromarray(a).save(folder / f"{i}.png")
    load_or_compute_reference(tmp_path, str(folder), data, SHAPE, ext)
    load_or_compute_reference(tmp_path, str(folder), data, SHAPE, ext)
    assert calls[3:] == [12]
    Image.fromarray(255 - images[0]).save(folder / "0.png")
    load_or_compute_reference(tmp_path, str(folder), data, SHAPE, ext)
    assert calls[3:] == [12, 12]
    # a damaged cache file is recomputed, not trusted
    (tmp_path / REF_FILE).write_bytes(b"not an npz")
    load_or_compute_reference(tmp_path, str(folder), data, SHAPE, ext)
    assert calls[3:] == [12, 12, 12]


def test_reference_refusals_are_one_line(tmp_path):
    ext = RandomProjectionExtractor(dim=8)
    for ref, match in [(str(tmp_path / "missing"), "no such file or folder"),
                       ("digits-test", "images are 8x8x1, the run makes 16x16x1")]:
        with pytest.raises(Exception, match=match) as info:
            load_or_compute_reference(tmp_path, ref, DataConfig(), (16, 16, 1), ext)
        assert "\n" not in str(info.value)


def test_training_data_against_its_own_statistics_has_fid_zero(tmp_path):
    ext = DigitsExtractor()
    ref = load_or_compute_reference(tmp_path, "", DataConfig(), SHAPE, ext)  # the training digits (1437)
    train = compute_stats(load_digits_split("train")[0][..., None], ext)
    same = ref.compare(train.features)
    # identical features: the streaming statistics equal np.cov's to round-off; FID 4e-13 measured, bound 1e-9
    # (the data floor, test digits against train digits, is 0.04)
    assert abs(same["fid"]) < 1e-9
    assert same["precision"] == same["recall"] == 1.0 and abs(same["kid"]) < 0.01
    held_out = ref.compare(compute_stats(load_digits_split("test")[0][..., None], ext).features)
    assert 0.02 < held_out["fid"] < 0.1 and 0 < held_out["fid_se"] < 0.5
    assert 0.8 < held_out["precision"] < 1 and 0.8 < held_out["recall"] < 1


def test_bootstrap_se_is_the_spread_of_resampled_fids():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16))
    r = rng.standard_normal((500, 16))
    mu, sigma = r.mean(0), np.cov(r, rowvar=False)
    g = np.random.default_rng(3)  # the same resample indices, FID by scipy's sqrtm
    direct = []
    for _ in range(20):
        x = f[g.integers(0, 300, 300)]
        direct.append(frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu, sigma))
    want = np.std(direct, ddof=1)
    assert bootstrap_fid_se(f, mu, sigma, seed=3) == pytest.approx(want, rel=1e-9)
    assert bootstrap_fid_se(f, mu, sigma, seed=3, use_torch=True) == pytest.approx(want, rel=1e-9)


class SlowEvaluator:
    """Stands in for PeriodicEvaluator: 0.25 s at steps 3, 6, 9 and at the end."""

    def __init__(self):
        self.last_step, self.calls = 0, []

    def due(self, step, final=False):
        return step > self.last_step and (final or (step % 3 == 0 and step <= 9))

    def run(self, trainer):
        time.sleep(0.25)
        self.last_step = trainer.step
        self.calls.append(trainer.step)
        return "train | FID 1"

    def state_dict(self):
        return {"last_step": self.last_step}


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t, **kwargs):
        return self.conv(x)


def test_evaluation_time_is_not_training_time():
    torch.manual_seed(0)
    diffusion = create_gaussian_diffusion(steps=20, noise_schedule="cosine")
    cfg = RunConfig(train=TrainConfig(batch_size=4, lr=1e-2, ema_rate="0.5", max_minutes=0.03, log_interval=0))
    batch = (torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1, {})
    ev = SlowEvaluator()
    trainer = Trainer(model=Tiny(), diffusion=diffusion, data=itertools.repeat(batch),
                      schedule_sampler=UniformSampler(diffusion), dist=DistContext(), cfg=cfg, progress=False,
                      evaluator=ev)
    result = trainer.run()
    assert result.stop_reason == "max_minutes" and ev.calls[:3] == [3, 6, 9] and ev.calls[-1] == result.step
    assert result.eval_seconds >= 4 * 0.25
    trained = result.seconds - result.eval_seconds
    assert 1.8 <= trained < 1.8 + 1.5  # the 1.8 s budget was spent training (+ at most a few slow steps on a
    # shared CPU); the evaluations came on top
    assert trainer.training_state()["eval"] == {"last_step": result.step}


def test_eval_sampler_picks_the_loop_and_its_diffusion():
    from iddpm.config import apply_overrides
    from iddpm.train.evaluation import known_samplers, prepare_evaluation

    base = apply_overrides(RunConfig(), dict(image_size=8, in_channels=1, num_channels=32, diffusion_steps=40,
                                             noise_schedule="cosine", eval_every=10, eval_steps=8))
    ancestral = prepare_evaluation(base, torch.device("cpu"))
    assert ancestral.diffusion.num_timesteps == 8 and ancestral.method == {"use_ddim": False}
    assert ancestral.extractor.name == "digits-cnn"  # as `iddpm eval` chooses for 8x8 grayscale
    if "dpm++2m" in known_samplers():  # the few-step solvers run on the full diffusion, 8 model evaluations
        solver = prepare_evaluation(apply_overrides(base, {"eval_sampler": "dpm++2m"}), torch.device("cpu"))
        assert solver.diffusion.num_timesteps == 40 and solver.method == {"sampler": "dpm++2m", "steps": 8}


TINY = ["train", "--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
        "--attention_resolutions", "", "--diffusion_steps", "20", "--noise_schedule", "cosine", "--batch_size", "4",
        "--max_steps", "1", "--no_progress"]


@pytest.mark.parametrize("flags, message", [
    (["--eval_every", "5", "--eval_samples", "1"], "--eval_samples 1: must be >= 2"),
    (["--eval_every", "5", "--eval_steps", "5", "--eval_sampler", "heun"],
     "--eval_sampler 'heun': unknown; choose one of ancestral, ddim"),
    (["--eval_every", "5", "--eval_steps", "21"], "--eval_steps 21: more than the run's 20 diffusion steps"),
    (["--keep_best"], "--keep_best: needs --eval_every N"),
    (["--eval_every", "5", "--eval_steps", "5", "--eval_ref", "nowhere/ref.npz"],
     "--eval_ref nowhere/ref.npz: no such file or folder"),
])
def test_bad_eval_settings_are_refused_at_start(tmp_path, capsys, flags, message):
    run = tmp_path / "run"
    assert main([*TINY, *flags, "--run_dir", str(run)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "no --data_dir and no --preset" not in line]
    assert len(err) == 1 and message in err[0], err  # one line (besides the digits-preset notice)
    assert not (run / "checkpoints").exists()


def test_missing_inception_is_refused_at_start(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("iddpm.eval.features.find_inception_torchscript", lambda: None)  # as if not installed
    data = tmp_path / "rgb.npz"
    np.savez(data, np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    run = tmp_path / "run"
    t0 = time.perf_counter()
    assert main([*TINY, "--image_size", "32", "--in_channels", "3", "--data_dir", str(data), "--eval_every", "100",
                 "--eval_steps", "5",
                 "--run_dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no InceptionV3 TorchScript found" in err[0] and "pip install" in err[0]
    assert not run.exists() and time.perf_counter() - t0 < 30  # before the run wrote or trained anything
