"""``iddpm train`` end to end on tiny configs: digits, an image folder, an npz (super-resolution); checkpoints,
resume, sample grids, config files, --dry_run and one-line errors."""

import csv
import io
import json

import numpy as np
import pytest
import torch
from helpers import TINY_TRAIN_FLAGS
from PIL import Image

from iddpm.checkpoints.run_dir import list_checkpoints, load_checkpoint, read_config
from iddpm.cli.main import main

TINY = [*TINY_TRAIN_FLAGS, "--batch_size", "4", "--log_interval", "1"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)


def _metrics(run):
    return list(csv.DictReader(io.StringIO((run / "metrics.csv").read_text())))


def test_digits_train_checkpoint_sample_resume(tmp_path):
    run = tmp_path / "run"
    argv = ["train", *TINY, "--in_channels", "1", "--learn_sigma", "True", "--max_steps", "3", "--save_interval", "2",
            "--sample_every", "3", "--keep_last", "5", "--run_dir", str(run)]
    assert main(argv) == 0
    assert [s for s, _ in list_checkpoints(run)] == [2, 3]
    png = run / "samples" / "step_00000003.png"
    assert png.is_file() and Image.open(png).size[0] > 8
    cfg = read_config(run)
    assert cfg.model.num_channels == 32 and cfg.train.max_steps == 3 and cfg.model.in_channels == 1
    rows = _metrics(run)
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert {"loss", "mse", "vb", "loss_q0", "grad_norm", "img_per_s", "samples"} <= set(rows[0])
    assert float(rows[-1]["samples"]) == 12
    assert list((run / "tb").glob("events.*"))
    assert main(["train", "--resume", "--run_dir", str(run), "--max_steps", "4", "--no_progress"]) == 0
    ck = load_checkpoint(run)
    assert ck.step == 4 and ck.config.train.max_steps == 4 and ck.state["data"]["batch"] == 4


def _image_folder(root, n=12):
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{'cat' if i % 2 else 'dog'}_{i:03d}.png")
    return root


def test_image_folder_class_conditional_and_resume_checkpoint(tmp_path):
    data = _image_folder(tmp_path / "images")
    run = tmp_path / "run"
    argv = ["train", *TINY, "--data_dir", str(data), "--class_cond", "True", "--num_classes", "2",
            "--max_steps", "2", "--run_dir", str(run)]
    assert main(argv) == 0
    first = load_checkpoint(run)
    assert first.step == 2 and "label_emb.weight" in first.model
    # continue from that step folder into a new run directory; the model config comes from the checkpoint
    other = tmp_path / "other"
    assert main(["train", "--resume_checkpoint", str(first.path), "--run_dir", str(other), "--max_steps", "3",
                 "--no_progress"]) == 0
    ck = load_checkpoint(other)
    assert ck.step == 3 and ck.config.model.class_cond and ck.config.data.data_dir == str(data)
    assert [r["step"] for r in _metrics(other)] == ["3"]


def test_npz_super_resolution(tmp_path):
    rng = np.random.default_rng(1)
    npz = tmp_path / "imgs.npz"
    np.savez(npz, arr_0=rng.integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8))
    run = tmp_path / "run"
    argv = ["train", *TINY, "--data_dir", str(npz), "--large_size", "8", "--small_size", "4", "--learn_sigma", "True",
            "--max_steps", "2", "--sample_every", "2", "--run_dir", str(run)]
    assert main(argv) == 0
    cfg = read_config(run)
    assert cfg.model.super_res and cfg.model.small_size == 4
    assert (run / "samples" / "step_00000002.png").is_file()
    assert load_checkpoint(run).step == 2


def test_config_file_and_dry_run(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "digits"\n[train]\nlr = 3e-4\nbatch_size = 16\n[model]\nnum_channels = 32\n')
    assert main(["train", "--config", str(toml), "--batch_size", "8", "--dry_run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["preset"] == "digits" and cfg["train"]["lr"] == 3e-4 and cfg["train"]["batch_size"] == 8
    assert cfg["model"]["num_channels"] == 32 and cfg["model"]["image_size"] == 8
    yaml = tmp_path / "run.yaml"
    yaml.write_text("lr: 0.001\nuse_fp16: true\n")
    assert main(["train", "--config", str(yaml), "--dry_run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["lr"] == 0.001 and cfg["train"]["use_fp16"] is True
    assert not (tmp_path / "runs").exists()


def test_no_data_and_no_preset_means_the_digits_preset(capsys):
    assert main(["train", "--dry_run", "--num_channels", "64"]) == 0
    out = capsys.readouterr()
    cfg = json.loads(out.out)
    assert "the 'digits' preset" in out.err
    assert cfg["preset"] == "digits" and cfg["model"]["image_size"] == 8 and cfg["model"]["in_channels"] == 1
    assert cfg["model"]["num_channels"] == 64  # explicit flags still win
    assert main(["train", "--dry_run", "--data_dir", "imgs/"]) == 0  # data given: the original's defaults
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["preset"] == "" and cfg["model"]["image_size"] == 64


def test_errors_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--in_channels", "1", "--class_cond", "True", "--num_classes", "5",
                 "--max_steps", "1", "--run_dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "--num_classes 5: the data has 10 classes; use --num_classes 10" in err
    assert main(["train", *TINY, "--in_channels", "1", "--max_steps", "1", "--run_dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["train", *TINY, "--in_channels", "1", "--max_steps", "1", "--run_dir", str(run)]) == 2
    assert "already holds checkpoints; add --resume" in capsys.readouterr().err
    assert main(["train", *TINY, "--batch_size", "6", "--microbatch", "8", "--run_dir", str(tmp_path / "x")]) == 2
    assert "--microbatch 8" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", *TINY, "--in_channels", "1", "--lr", "1e30", "--max_steps", "5", "--save_interval", "1",
            "--run_dir", str(run)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 2 (timesteps [" in err and "step_00000001" in err
    assert [s for s, _ in list_checkpoints(run)] == [1]


def test_fp16_skips_non_finite_steps_instead(tmp_path):
    run = tmp_path / "run"
    argv = ["train", *TINY, "--in_channels", "1", "--lr", "1e30", "--max_steps", "3", "--use_fp16", "True",
            "--run_dir", str(run)]
    assert main(argv) == 0
    rows = _metrics(run)
    assert sum(float(r["skipped_steps"]) for r in rows) >= 1
    ck = load_checkpoint(run)
    assert ck.step == 3 and ck.state["precision"] == "fp16" and ck.state["scaler"]["scale"] < 2.0**20


def test_time_budget(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--in_channels", "1", "--max_minutes", "0.001", "--run_dir", str(run)]) == 0
    assert list_checkpoints(run)


def test_resume_from_the_originals_pt_files(tmp_path):
    """``--resume_checkpoint modelNNNNNN.pt`` (improved-diffusion's naming) with its ema_/opt siblings."""
    from iddpm.build import build_model
    from iddpm.cli.args import resolve_run_config
    from iddpm.cli.main import build_parser

    argv = ["train", *TINY, "--in_channels", "1", "--ema_rate", "0.9", "--max_steps", "7"]
    cfg = resolve_run_config(build_parser().parse_args(argv))
    torch.manual_seed(3)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).sum().backward()
    opt.step()
    old = tmp_path / "old"
    old.mkdir()
    torch.save(model.state_dict(), old / "model000005.pt")
    ema = {k: v + 1.0 for k, v in model.state_dict().items()}
    torch.save(ema, old / "ema_0.9_000005.pt")
    torch.save(opt.state_dict(), old / "opt000005.pt")
    run = tmp_path / "run"
    assert main([*argv, "--resume_checkpoint", str(old / "model000005.pt"), "--run_dir", str(run)]) == 0
    ck = load_checkpoint(run)
    assert ck.step == 7 and [r["step"] for r in _metrics(run)] == ["6", "7"]
    assert int(ck.optimizer["state"][0]["step"]) == 3  # 1 step from the .pt + 2 here
    # EMA continued from the sibling file (far from the weights, which were 1.0 lower)
    k = "out.2.bias"
    assert float((ck.emas[0.9][k] - ck.model[k]).abs().min()) > 0.5
