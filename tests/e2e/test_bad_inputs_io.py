"""Bad files and paths given to the CLI: each is one line on stderr (rc 2), naming the flag or file, no traceback,
and the files already there (run directory, output folder, the file named by ``--out``) are left byte-identical.

The table holds the data / file / message cases of issue 11 and, beside them, errors that were already good (so
they stay so).  Everything runs in-process through :func:`iddpm.cli.main.main`; one case also runs as a real
``python -m iddpm`` process to show what a user sees.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_weights
from PIL import Image
from safetensors.torch import save_file

from iddpm.checkpoints.model_file import save_model_file
from iddpm.cli.main import main
from iddpm.config import RunConfig, apply_overrides

TINY = dict(image_size=8, in_channels=1, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            attention_resolutions="4", learn_sigma=True, diffusion_steps=20, noise_schedule="cosine")
SR = dict(TINY, small_size=4, in_channels=3)
TRAIN_TINY = ["--preset", "digits", "--image_size", "8", "--in_channels", "1", "--num_channels", "32",
              "--num_res_blocks", "1", "--channel_mult", "1,2", "--attention_resolutions", "4",
              "--diffusion_steps", "20", "--noise_schedule", "cosine", "--no_progress"]


def _cfg(**settings) -> RunConfig:
    return apply_overrides(RunConfig(), settings).validate()


def _png(path: Path, value: int = 0, size: int = 8) -> None:
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)


def _header_safetensors(path: Path, metadata_config: str) -> None:
    save_file({"a": torch.zeros(2)}, str(path), metadata={"iddpm_format": "model/1", "iddpm_config": metadata_config})


def _truncated_safetensors(path: Path) -> None:
    """A safetensors file cut inside its header, whose header length (0x280) starts with the byte 0x80 -- the
    first byte of a pickle, which is what the old message called it."""
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (0x280 - len(header))
    path.write_bytes((struct.pack("<Q", len(header)) + header + bytes(8))[:300])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Every input of the table, built once (tiny models, hostile files, a previous output folder and run)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    f = {"root": root}
    cfg, sr_cfg = _cfg(**TINY), _cfg(**SR)
    f["model"] = save_model_file(root / "model.safetensors", random_weights(cfg), cfg)
    f["sr"] = save_model_file(root / "sr.safetensors", random_weights(sr_cfg), sr_cfg)
    rng = np.random.default_rng(0)
    np.savez(root / "base.npz", rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8))
    np.savez(root / "base8.npz", rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8))
    np.savez(root / "objects.npz", np.array([{"not": "images"}, None], dtype=object))
    (root / "notes.npz").write_text("a text file renamed .npz\n")
    np.save(root / "one.npy", np.zeros((2, 4, 4, 3), np.uint8))
    _header_safetensors(root / "config_array.safetensors", "[1, 2, 3]")
    _header_safetensors(root / "config_deep.safetensors", "[" * 100_000 + "]" * 100_000)
    _truncated_safetensors(root / "truncated.safetensors")
    torch.save({"model": random_weights(cfg), "step": np.int64(3)}, root / "with_objects.pt")
    torch.save(random_weights(cfg), root / "plain.pt")
    (root / "taken.txt").write_text("a file the user keeps\n")
    bad = root / "bad_images"
    bad.mkdir()
    (bad / "a.png").write_text("text, renamed")
    _png(bad / "b.png", 10, 64)
    (bad / "b.png").write_bytes((bad / "b.png").read_bytes()[:40])
    prev = root / "previous_samples"  # what an earlier `iddpm sample --out previous_samples` left
    prev.mkdir()
    (prev / "samples_2x8x8x1.npz").write_bytes(b"earlier samples")
    (prev / "grid.png").write_bytes(b"earlier grid")
    run = root / "run"  # a run directory with a checkpoint
    step = run / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    save_model_file(step / "model.safetensors", random_weights(cfg), cfg)
    (run / "config.json").write_text(cfg.to_json())
    (run / "metrics.csv").write_text("step,loss\n1,0.5\n2,0.4\n")
    return f


def _p(name: str):
    """A placeholder for ``files[name]`` in a table row (resolved per test)."""
    return ("path", name)


# (id, argv with placeholders, text the one stderr line must contain, paths that must stay byte-identical)
CASES = [
    # --- issue 11: data, files and messages --------------------------------------------------------------------
    ("upsample-object-npz", ["upsample", "--run", _p("sr"), "--base_samples", _p("objects.npz"),
                             "--out", _p("previous_samples")],
     ["objects.npz: holds Python objects", "was not loaded"], ["previous_samples"]),
    ("upsample-text-npz", ["upsample", "--run", _p("sr"), "--base_samples", _p("notes.npz"),
                           "--out", _p("previous_samples")],
     ["--base_samples", "notes.npz: not an .npz file"], ["previous_samples"]),
    ("upsample-npy", ["upsample", "--run", _p("sr"), "--base_samples", _p("one.npy")],
     ["one.npy: a .npy file (one array), not an .npz"], []),
    ("upsample-missing-npz", ["upsample", "--run", _p("sr"), "--base_samples", _p("nowhere.npz")],
     ["--base_samples", "nowhere.npz: no such file"], []),
    ("config-metadata-array", ["sample", "--run", _p("config_array.safetensors")],
     ["config_array.safetensors: iddpm_config metadata is a JSON array, not an object"], []),
    ("config-metadata-deep", ["sample", "--run", _p("config_deep.safetensors")],
     ["config_deep.safetensors: iddpm_config metadata is nested too deeply"], []),
    ("truncated-safetensors", ["sample", "--run", _p("truncated.safetensors")],
     ["truncated.safetensors", "a truncated safetensors file"], []),
    ("pt-with-objects", ["sample", "--run", _p("with_objects.pt"), "--preset", "digits"],
     ["with_objects.pt: not a plain state_dict", "could run arbitrary code", "only if you trust the file",
      "weights_only=False"], []),
    ("convert-pt-with-objects", ["convert-openai", _p("with_objects.pt"), "--preset", "digits",
                                 "-o", _p("converted.safetensors")],
     ["with_objects.pt: not a plain state_dict"], []),
    ("sample-out-is-a-file", ["sample", "--run", _p("model"), "--out", _p("taken.txt")],
     ["--out", "taken.txt: is an existing file, not a folder"], ["taken.txt"]),
    ("sample-out-under-a-file", ["sample", "--run", _p("model"), "--out", _p("taken.txt/sub")],
     ["--out", "lies under", "taken.txt"], ["taken.txt"]),
    ("upsample-out-is-a-file", ["upsample", "--run", _p("sr"), "--base_samples", _p("base.npz"),
                                "--out", _p("taken.txt")],
     ["--out", "taken.txt: is an existing file"], ["taken.txt"]),
    ("nll-no-readable-image", ["nll", "--run", _p("model"), "--data_dir", _p("bad_images"), "--out",
                               _p("nll_never.csv")],
     ["--data_dir", "none of the 2 image files can be read", "a.png (not a recognised image file)"], []),
    ("train-no-readable-image", ["train", *TRAIN_TINY, "--data_dir", _p("bad_images"), "--run_dir", _p("fresh_run"),
                                 "--max_steps", "1"],
     ["--data_dir", "none of the 2 image files can be read"], []),
    # --- errors that were already good --------------------------------------------------------------------------
    ("respacing", ["sample", "--run", _p("model"), "--timestep_respacing", "ddim8", "--out", _p("previous_samples")],
     ["--timestep_respacing ddim8: 20 steps cannot be strided"], ["previous_samples"]),
    ("eta-without-ddim", ["sample", "--run", _p("model"), "--eta", "0.5", "--out", _p("previous_samples")],
     ["--eta 0.5: only used with --use_ddim"], ["previous_samples"]),
    ("batch-size-0", ["sample", "--run", _p("model"), "--batch_size", "0", "--out", _p("previous_samples")],
     ["--batch_size 0"], ["previous_samples"]),
    ("class-on-unconditional", ["sample", "--run", _p("model"), "--class", "3", "--out", _p("previous_samples")],
     ["not class-conditional"], ["previous_samples"]),
    ("changed-model-flag", ["sample", "--run", _p("model"), "--num_channels", "64"], ["--num_channels"], []),
    ("missing-run", ["sample", "--run", _p("no_such_run")], ["no_such_run", "no such file or directory"], []),
    ("pt-without-preset", ["sample", "--run", _p("plain.pt")], ["plain.pt", "add --preset"], []),
    ("sample-on-super-res", ["sample", "--run", _p("sr")], ["iddpm upsample"], []),
    ("upsample-wrong-size", ["upsample", "--run", _p("sr"), "--base_samples", _p("base8.npz")],
     ["--base_samples", "images are 8x8x3, the model upsamples 4x4x3"], []),
    ("nll-out-suffix", ["nll", "--run", _p("model"), "--out", _p("nll.txt")], ["--out", "nll.txt"], []),
    ("eval-missing-samples", ["eval", _p("missing.npz"), "digits-test"], ["missing.npz"], []),
    ("microbatch", ["train", *TRAIN_TINY, "--batch_size", "6", "--microbatch", "8", "--run_dir", _p("fresh_run")],
     ["--microbatch"], []),
    ("train-over-a-run", ["train", *TRAIN_TINY, "--run_dir", _p("run"), "--max_steps", "1"],
     ["--run_dir", "run"], ["run"]),
    ("resume-missing-run", ["train", *TRAIN_TINY, "--resume", "--run_dir", _p("no_such_run"), "--max_steps", "1"],
     ["no_such_run: no such file or folder"], []),
]


def _argv(template: list, files: dict[str, Path]) -> list[str]:
    """The table's argv with each placeholder replaced by its path (a fixture's file, else ROOT/name)."""
    return [str(files.get(a[1], files["root"] / a[1])) if isinstance(a, tuple) else a for a in template]


def _snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file below ``path`` (or ``path`` itself) -> its bytes; None when it does not exist."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_error(case, files, capsys):
    _, template, expected, kept = case
    argv = _argv(template, files)
    before = {name: _snapshot(files["root"] / name) for name in kept}
    assert all(v is not None for v in before.values())
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"iddpm {argv[0]}: error: "), lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    for name, snap in before.items():
        assert _snapshot(files["root"] / name) == snap, f"{name} changed"


def test_unreadable_images_are_skipped_with_one_warning_and_nll_says_how_many_it_used(files, tmp_path, capsys):
    """A truncated PNG and a text file among good images: one warning line (count, names), the rest is used; and
    ``--num_examples`` beyond the data says how many examples it used (the original's image_nll --num_samples)."""
    data = tmp_path / "mixed"
    data.mkdir()
    for i in range(4):
        _png(data / f"img_{i}.png", 40 * i)
    _png(data / "cut.png", 0, 64)
    (data / "cut.png").write_bytes((data / "cut.png").read_bytes()[:60])
    (data / "readme.png").write_text("not an image")
    out = tmp_path / "nll.csv"
    cfg = _cfg(**dict(TINY, diffusion_steps=4))  # 4 steps: the NLL loop is a few forward passes
    model = save_model_file(tmp_path / "m4.safetensors", random_weights(cfg), cfg)
    assert main(["nll", "--run", str(model), "--data_dir", str(data), "--num_samples", "50",
                 "--batch_size", "4", "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    warnings = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(warnings) == 1 and warnings[0].startswith(f"iddpm: warning: --data_dir {data}: skipped 2 of 6")
    assert "cut.png (truncated)" in warnings[0] and "readme.png (not a recognised image file)" in warnings[0]
    assert "--num_examples 50: the data has only 4 examples; used all" in captured.out
    assert "over 4 examples" in captured.out and out.is_file()


def test_a_real_process_prints_one_line_and_no_traceback(files, tmp_path):
    """What a user sees: ``python -m iddpm upsample --base_samples OBJECTS.npz`` -> rc 2, one stderr line."""
    env = dict(os.environ, PYTHONWARNINGS="error::UserWarning")  # a stray warning would show up as a failure
    proc = subprocess.run([sys.executable, "-m", "iddpm", "upsample", "--model_path", str(files["sr"]),
                           "--base_samples", str(files["root"] / "objects.npz"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("iddpm upsample: error: --base_samples ") and "holds Python objects" in lines[0]
    assert not (tmp_path / "o").exists()
