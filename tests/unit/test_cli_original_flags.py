"""The original's command lines (improved-diffusion README and its scripts' flags) parse with ``iddpm``.

``iddpm sample`` replaces ``scripts/image_sample.py``, ``iddpm nll`` ``scripts/image_nll.py`` and ``iddpm upsample``
``scripts/super_res_sample.py``: each script's own flags and the model/diffusion flags of ``script_util`` are
accepted under their original names, with the values the original would use.
"""

from __future__ import annotations

import shlex

import pytest

from iddpm.cli.args import given
from iddpm.cli.main import build_parser
from iddpm.cli.sample import model_overrides
from iddpm.config import NLLConfig, RunConfig, SampleConfig, apply_overrides

# (name, MODEL_FLAGS, DIFFUSION_FLAGS) of the README's "Models and Hyperparameters" section, verbatim.
README_FLAGS = [
    ("imagenet64_uncond", "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True",
     "--diffusion_steps 4000 --noise_schedule cosine"),
    ("cifar10_uncond", "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3",
     "--diffusion_steps 4000 --noise_schedule cosine"),
    ("imagenet64_cond", "--image_size 64 --num_channels 192 --num_res_blocks 3 --learn_sigma True --class_cond True",
     "--diffusion_steps 4000 --noise_schedule cosine --rescale_learned_sigmas False --rescale_timesteps False"),
    ("lsun_1e-4", "--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True "
     "--use_scale_shift_norm False --attention_resolutions 16",
     "--diffusion_steps 1000 --noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False"),
    ("lsun_2e-5", "--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True "
     "--use_scale_shift_norm False --attention_resolutions 16",
     "--diffusion_steps 1000 --noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False "
     "--use_scale_shift_norm False"),
    ("imagenet64_vlb", "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True",
     "--diffusion_steps 4000 --noise_schedule cosine --use_kl True"),
    ("cifar10_vlb", "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3",
     "--diffusion_steps 4000 --noise_schedule cosine --use_kl True"),
]
UPSAMPLE_MODEL = "--num_channels 192 --num_res_blocks 2 --learn_sigma True --class_cond True"
UPSAMPLE_DIFFUSION = "--diffusion_steps 4000 --noise_schedule linear --rescale_learned_sigmas False " \
                     "--rescale_timesteps False"
# every model/diffusion flag of the original's script_util.model_and_diffusion_defaults(), with a value
ALL_SCRIPT_UTIL = ("--image_size 64 --num_channels 128 --num_res_blocks 2 --num_heads 4 --num_heads_upsample -1 "
                   "--attention_resolutions 16,8 --dropout 0.0 --learn_sigma False --sigma_small False "
                   "--class_cond False --diffusion_steps 1000 --noise_schedule linear --timestep_respacing 250 "
                   "--use_kl False --predict_xstart False --rescale_timesteps True --rescale_learned_sigmas True "
                   "--use_checkpoint False --use_scale_shift_norm True")

SCRIPTS = {"image_sample.py": "sample", "image_nll.py": "nll", "super_res_sample.py": "upsample"}


def parse(command_line: str):
    """``python scripts/X.py FLAGS`` -> the ``iddpm`` namespace of the command that replaces X."""
    words = shlex.split(command_line)
    assert words[:2] == ["python", words[1]] and words[1].startswith("scripts/")
    return build_parser().parse_args([SCRIPTS[words[1].split("/")[1]], *words[2:]])


def as_overrides(flags: str) -> dict:
    """The model/diffusion settings a flag string means, as the original's argparse would give them."""
    words = shlex.split(flags)
    values = {}
    for name, value in zip(words[::2], words[1::2]):
        values[name[2:]] = {"True": True, "False": False}.get(value, value)
    return values


@pytest.mark.parametrize("name,model_flags,diffusion_flags", README_FLAGS, ids=[r[0] for r in README_FLAGS])
def test_readme_image_sample_command(name, model_flags, diffusion_flags):
    args = parse(f"python scripts/image_sample.py --model_path /path/to/model.pt {model_flags} {diffusion_flags}")
    assert args.command == "sample" and args.run == "/path/to/model.pt"
    overrides, respacing = model_overrides(args)
    assert respacing is None
    for key, value in as_overrides(f"{model_flags} {diffusion_flags}").items():
        assert str(overrides[key]) == str(value), key
    apply_overrides(RunConfig(), overrides).validate()  # what loading the .pt with these flags builds


def test_readme_sampling_options():
    """``--timestep_respacing 250`` / ``ddim250`` and ``--use_ddim True``, plus image_sample.py's own flags."""
    model, diffusion = README_FLAGS[0][1:]
    args = parse(f"python scripts/image_sample.py --model_path m.pt {model} {diffusion} --timestep_respacing ddim250 "
                 "--use_ddim True --num_samples 100 --batch_size 16 --clip_denoised False")
    settings = {k: v for k, v in given(args, SampleConfig).items() if k != "classes"}  # --balanced's default
    assert settings == dict(use_ddim=True, num_samples=100, batch_size=16, clip_denoised=False)
    assert model_overrides(args)[1] == "ddim250"


def test_every_script_util_flag_is_accepted_by_each_command():
    for script, extra in (("image_sample.py", ""), ("image_nll.py", "--data_dir imgs"),
                          ("super_res_sample.py", "--base_samples b.npz --small_size 16")):
        args = parse(f"python scripts/{script} --model_path m.pt {extra} {ALL_SCRIPT_UTIL}")
        overrides, respacing = model_overrides(args)
        assert respacing == "250" and overrides["num_heads_upsample"] == -1 and overrides["sigma_small"] is False
        assert overrides["use_checkpoint"] is False and overrides["attention_resolutions"] == "16,8"


def test_image_nll_command():
    args = parse("python scripts/image_nll.py --data_dir path/to/images --model_path /path/to/model.pt "
                 f"{README_FLAGS[1][1]} {README_FLAGS[1][2]} --num_samples 1000 --batch_size 1 --clip_denoised True")
    assert args.command == "nll" and args.run == "/path/to/model.pt"
    assert given(args, NLLConfig) == dict(data_dir="path/to/images", num_examples=1000, batch_size=1,
                                          clip_denoised=True)


def test_super_res_sample_command():
    args = parse("python scripts/super_res_sample.py --base_samples 64_samples.npz --model_path upsample_cond_500K.pt "
                 f"--large_size 256 --small_size 64 {UPSAMPLE_MODEL} {UPSAMPLE_DIFFUSION} --num_samples 10 "
                 "--batch_size 4 --use_ddim False --clip_denoised True")
    assert args.command == "upsample" and args.base_samples == "64_samples.npz"
    assert args.run == "upsample_cond_500K.pt"
    overrides, _ = model_overrides(args)
    assert overrides["image_size"] == 256 and overrides["small_size"] == 64 and overrides["class_cond"] is True
    settings = {k: v for k, v in given(args, SampleConfig).items() if k != "classes"}
    assert settings == dict(num_samples=10, batch_size=4, use_ddim=False, clip_denoised=True)
    apply_overrides(RunConfig(), overrides).validate()
