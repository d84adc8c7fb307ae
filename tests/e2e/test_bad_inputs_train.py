"""The training run and its run directory under bad inputs (issue 11): each refusal is one line on stderr naming the
flag or file, no traceback, the right exit code, and every file already there byte-identical afterwards.

Besides the table: the run-directory lock across two processes (and after SIGKILL of the holder), the ``sample
--out`` lock, what a resume says it restored, ``--overwrite``, the stop on an fp16 loss-scale collapse, the last
*good* checkpoint after an exploding loss (also across a resume), double and triple Ctrl-C, and ``--deterministic``.
Everything runs in-process through :func:`iddpm.cli.main.main` except where a second process is the point.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_TRAIN_FLAGS, tiny_cfg

import iddpm.checkpoints.run_dir as run_dir_module
from iddpm.checkpoints.run_dir import list_checkpoints, load_checkpoint
from iddpm.cli.main import main
from iddpm.runtime.lock import FolderLocked, lock_folder
from iddpm.train.app import build_trainer
from iddpm.train.trainer import Trainer, TrainingAborted

TINY = ["--preset", "digits", *TINY_TRAIN_FLAGS, "--in_channels", "1", "--batch_size", "2", "--log_interval", "1"]
# fp16 autocast on a CPU is slow (~0.5 s a step here): one example, no attention
FP16 = ["--preset", "digits", *TINY_TRAIN_FLAGS, "--in_channels", "1", "--batch_size", "1", "--log_interval", "1",
        "--attention_resolutions", "", "--precision", "fp16"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 2-step run (checkpoints at steps 1 and 2, metrics, config.json); copy it before changing it."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *TINY, "--max_steps", "2", "--save_interval", "1", "--run_dir", str(run)]) == 0
    return run


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            for p in sorted(root.rglob("*"))}


def _rows(run: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO((run / "metrics.csv").read_text())))


def _stale_config(run: Path, tmp: Path) -> None:
    """What the old bug left behind: config.json rewritten with the refused --num_channels 64."""
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["num_channels"] = 64
    (run / "config.json").write_text(json.dumps(cfg))


def _no_checkpoints(run: Path, tmp: Path) -> None:
    shutil.rmtree(run / "checkpoints")


def _a_file(run: Path, tmp: Path) -> None:
    (tmp / "afile").write_text("not a folder\n")


def _other_run_files(run: Path, tmp: Path) -> None:
    (tmp / "other").mkdir()
    shutil.copy(run / "config.json", tmp / "other" / "config.json")
    shutil.copy(run / "metrics.csv", tmp / "other" / "metrics.csv")


def _read_only(run: Path, tmp: Path, monkeypatch) -> None:
    """chmod a-w; as root (who may write anyway) os.access is made to answer as it would for a user."""
    for p in (run, run / "checkpoints"):
        p.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(run_dir_module.os, "access", lambda p, mode, **kw: False if Path(p) in (
            run, run / "checkpoints") and mode & os.W_OK else real(p, mode, **kw))


RESUME = ["train", "--resume", "--run_dir", "{run}", "--max_steps", "3", "--no_progress"]
FRESH = ["train", *TINY, "--max_steps", "1"]
# (id, setup(run, tmp), argv with {run} / {tmp}, rc, texts the one stderr line contains)
CASES = [
    ("resume-changed-model", None, [*RESUME, "--num_channels", "64"], 2,
     ["--num_channels 64: drop --num_channels, the run was trained with 32", "step_00000002"]),
    ("resume-changed-diffusion", None, [*RESUME, "--diffusion_steps", "100"], 2,
     ["--diffusion_steps 100: drop --diffusion_steps, the run was trained with 40"]),
    ("resume-changed-learn-sigma", None, [*RESUME, "--learn_sigma", "False"], 2,
     ["--learn_sigma False: drop --learn_sigma, the run was trained with True"]),
    ("resume-stale-config-json", _stale_config, RESUME, 2,
     ["config.json says so but", "was trained with 32; pass --num_channels 32"]),
    ("fresh-over-another-runs-files", _no_checkpoints, [*FRESH, "--run_dir", "{run}"], 2,
     ["--run_dir", "holds another run's config.json, metrics.csv, tb", "add --overwrite"]),
    ("fresh-over-checkpoints", None, [*FRESH, "--run_dir", "{run}"], 2,
     ["--run_dir", "already holds checkpoints; add --resume"]),
    ("overwrite-keeps-checkpoints", None, [*FRESH, "--run_dir", "{run}", "--overwrite"], 2,
     ["--overwrite never deletes checkpoints"]),
    ("resume-checkpoint-into-another-run", _other_run_files,
     [*FRESH, "--resume_checkpoint", "{run}/checkpoints/step_00000001", "--run_dir", "{tmp}/other"], 2,
     ["--run_dir", "other: holds another run's config.json, metrics.csv"]),
    ("run-dir-under-a-file", _a_file, [*FRESH, "--run_dir", "{tmp}/afile/run"], 2,
     ["--run_dir", "afile, which is a file, not a folder"]),
    ("run-dir-is-a-file", _a_file, [*FRESH, "--run_dir", "{tmp}/afile"], 2, ["--run_dir", "afile: is a file"]),
    ("resume-under-a-file", _a_file, ["train", "--resume", "--run_dir", "{tmp}/afile/run"], 2,
     ["--run_dir", "which is a file"]),
    ("resume-read-only", _read_only, RESUME, 2, ["--run_dir", "is not writable (permission denied)"]),
    ("resume-without-checkpoint", _no_checkpoints, RESUME, 2, ["no checkpoints found"]),
    ("resume-finished-run", None, ["train", "--resume", "--run_dir", "{run}", "--max_steps", "2", "--no_progress"],
     0, ["run already at step 2 (max_steps 2); nothing to do"]),
    # already one-line before issue 11 (kept so)
    ("lr-nan", None, [*FRESH, "--lr", "nan", "--run_dir", "{tmp}/new"], 2, ["--lr nan"]),
    ("diffusion-steps-1", None, [*FRESH, "--diffusion_steps", "1", "--run_dir", "{tmp}/new"], 2,
     ["--diffusion_steps 1"]),
    ("negative-save-interval", None, [*FRESH, "--save_interval", "-1", "--run_dir", "{tmp}/new"], 2,
     ["--save_interval -1"]),
    ("negative-max-steps", None, [*FRESH, "--max_steps", "-5", "--run_dir", "{tmp}/new"], 2, ["--max_steps -5"]),
]


@pytest.mark.parametrize("case_id, setup, argv, rc, texts", CASES, ids=[c[0] for c in CASES])
def test_bad_train_input_is_one_line_and_touches_nothing(trained, tmp_path, capsys, monkeypatch, case_id, setup,
                                                          argv, rc, texts):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    if setup is _read_only:
        setup(run, tmp_path, monkeypatch)
    elif setup is not None:
        setup(run, tmp_path)
    before = _hashes(tmp_path)
    capsys.readouterr()
    try:
        assert main([a.format(run=run, tmp=tmp_path) for a in argv]) == rc
    finally:
        for p in (run, run / "checkpoints"):
            if p.is_dir():
                p.chmod(0o755)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    for text in texts:
        assert text in lines[0], lines[0]
    assert _hashes(tmp_path) == before  # nothing written, nothing created, nothing deleted


def test_refused_model_change_leaves_a_resumable_run_and_resume_says_what_it_restored(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert main(["train", "--resume", "--run_dir", str(run), "--max_steps", "3", "--num_channels", "64"]) == 2
    capsys.readouterr()
    assert main(["train", "--resume", "--run_dir", str(run), "--max_steps", "3", "--no_progress"]) == 0
    err = capsys.readouterr().err
    assert (f"iddpm train: resumed {run / 'checkpoints' / 'step_00000002'} at step 2: restored model, EMA 0.999, "
            "optimizer, timestep-sampler state (uniform), data position, RNG\n") in err
    assert "digits' preset" not in err  # the run's own config, not the embedded default
    assert load_checkpoint(run).step == 3
    # a changed EMA list and batch size: what starts fresh is named
    assert main(["train", "--resume", "--run_dir", str(run), "--max_steps", "4", "--ema_rate", "0.999,0.9",
                 "--batch_size", "4", "--no_progress"]) == 0
    assert "restored model, EMA 0.999, optimizer, timestep-sampler state (uniform), RNG; fresh: EMA 0.9 (from the " \
           "weights), data position" in capsys.readouterr().err


def test_overwrite_replaces_another_runs_files(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "checkpoints")
    (run / "samples").mkdir()
    (run / "samples" / "step_00000099.png").write_bytes(b"old")
    old_tb = sorted((run / "tb").glob("events.*"))
    assert old_tb and [r["step"] for r in _rows(run)] == ["1", "2"]
    assert main(["train", *TINY, "--max_steps", "1", "--num_channels", "64", "--run_dir", str(run),
                 "--overwrite"]) == 0
    assert [r["step"] for r in _rows(run)] == ["1"]
    assert json.loads((run / "config.json").read_text())["model"]["num_channels"] == 64
    assert not (run / "samples").exists() and not any(p in old_tb for p in (run / "tb").glob("events.*"))
    assert [s for s, _ in list_checkpoints(run)] == [1]


def _training_process(run: Path, *flags: str, until) -> subprocess.Popen:
    """``python -m iddpm train`` (TINY) into ``run``, returned once ``until()`` holds (failing if it exits first)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("OPENAI_LOGDIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "iddpm", "train", *TINY, *flags, "--run_dir", str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not until():
        if proc.poll() is not None:
            pytest.fail(proc.communicate()[1][-2000:])
        time.sleep(0.1)
    return proc


def test_second_trainer_is_refused_while_the_first_holds_the_lock_and_not_after_sigkill(tmp_path, capsys):
    run = tmp_path / "run"
    holder = _training_process(run, "--max_steps", "100000", "--save_interval", "1", "--keep_last", "2",
                               until=lambda: list_checkpoints(run))
    try:
        assert (run / ".lock").read_text().startswith(f"pid {holder.pid} on host {socket.gethostname()} since ")
        capsys.readouterr()
        for argv in (["train", *TINY, "--max_steps", "1", "--run_dir", str(run)],  # fresh
                     ["train", "--resume", "--run_dir", str(run), "--no_progress"]):  # and --resume
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"iddpm train: error: --run_dir {run}: in use by pid {holder.pid} on host "
                                  f"{socket.gethostname()} since "), err
            assert "\n" not in err and "wait for it to finish" in err
    finally:
        holder.kill()  # SIGKILL: no handler runs, the kernel drops the lock
        holder.communicate(timeout=60)
    lock_folder(run).release()  # free again
    assert main(["train", "--resume", "--run_dir", str(run), "--max_steps", str(load_checkpoint(run).step + 1),
                 "--no_progress"]) == 0


def test_sample_out_folder_being_written_is_refused(trained, tmp_path, capsys):
    out = tmp_path / "out"
    with lock_folder(out, flag="--out"):
        assert main(["sample", "--run", str(trained), "--out", str(out), "--num_samples", "2", "--batch_size", "2",
                     "--timestep_respacing", "4", "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"--out {out}: in use by pid {os.getpid()} on host" in err and "\n" not in err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    with lock_folder(out, flag="--out"), pytest.raises(FolderLocked):  # two locks in one process: two holders
        lock_folder(out, flag="--out")
    assert main(["sample", "--run", str(trained), "--out", str(out), "--num_samples", "2", "--batch_size", "2",
                 "--timestep_respacing", "4", "--quiet"]) == 0
    assert list(out.glob("samples_2x8x8x1.npz"))


def test_fp16_loss_scale_collapse_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", *FP16, "--lr", "1e4", "--max_steps", "100", "--save_interval", "2", "--keep_last", "2",
            "--run_dir", str(run)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("iddpm train: ")]  # besides the log lines
    assert "Traceback" not in err and len(lines) == 1, err
    err = lines[0]
    # steps 1-3 overflow at 2^20..2^18 (skipped, weights untouched); step 4 updates the weights into ones whose
    # forward pass is NaN from step 5 on: 8 NaN steps later the run stops
    assert "fp16 loss scaling collapsed at step 12: 11 of the last 12 steps were skipped" in err, err
    assert "the loss was NaN/inf on the last 8 steps" in err
    assert f"Last good checkpoint: {run / 'checkpoints' / 'step_00000002'} (step_00000004, step_00000006, " \
           "step_00000008, step_00000010 were saved" in err
    assert [s for s, _ in list_checkpoints(run)] == [2, 8, 10]  # the good one survives --keep_last 2
    assert [r["step"] for r in _rows(run)][-1] == "11"  # the stop step is not logged, nothing saved at it


def test_exploding_loss_names_the_last_good_checkpoint_also_after_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--lr", "1e-3", "--max_steps", "3", "--save_interval", "1", "--run_dir",
                 str(run)]) == 0
    capsys.readouterr()
    # lr 3 on resume: the loss of step 4 is the good weights' (step_3 is good), step 5 ~1e5 (step_4 exploded),
    # then NaN (step_5 too)
    assert main(["train", "--resume", "--run_dir", str(run), "--lr", "3", "--max_steps", "20", "--keep_last", "1",
                 "--no_progress"]) == 1
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if "error:" in ln][0]
    assert "non-finite loss at step 6" in line, line
    assert f"Last good checkpoint: {run / 'checkpoints' / 'step_00000003'} (step_00000004, step_00000005 were " \
           "saved as the loss left its normal range (loss " in line
    assert " at step 5, NaN/inf at step 6): do not resume from them)" in line
    assert [s for s, _ in list_checkpoints(run)] == [3, 5]
    # resuming the latest (untrusted) checkpoint says so, and a NaN there still names step_3
    assert main(["train", "--resume", "--run_dir", str(run), "--max_steps", "20", "--no_progress"]) == 1
    err = capsys.readouterr().err
    assert "warning: step_00000004 and later were saved after the loss left its normal range" in err
    assert f"--resume_checkpoint {run / 'checkpoints' / 'step_00000003'}" in err
    assert f"Last good checkpoint: {run / 'checkpoints' / 'step_00000003'}" in err


class _Signals:
    """A loader wrapper raising ``SIGINT`` ``fetch`` times while batch ``at`` is fetched (the step in progress)."""

    def __init__(self, loader, at: int, fetch: int) -> None:
        self.loader, self.at, self.fetch = loader, at, fetch

    def __iter__(self):
        for i, batch in enumerate(self.loader, 1):
            for _ in range(self.fetch if i == self.at else 0):
                signal.raise_signal(signal.SIGINT)
            yield batch

    def state_dict(self):
        return self.loader.state_dict()


def _signalled_trainer(tmp_path, monkeypatch, during_save: int):
    """A trainer that gets one SIGINT during step 3 and ``during_save`` more as its checkpoint is being written."""
    prepared = build_trainer(tiny_cfg(batch_size=2, max_steps=50, save_interval=2, log_interval=0),
                             run_dir=tmp_path / "run", progress=False)
    trainer = prepared.trainer
    trainer.data = _Signals(trainer.data, at=3, fetch=1)
    real_save = Trainer.save

    def save(self):
        if self.step == 3:
            for _ in range(during_save):
                signal.raise_signal(signal.SIGINT)
        return real_save(self)

    monkeypatch.setattr(Trainer, "save", save)
    return prepared


def test_second_ctrl_c_while_stopping_still_writes_the_checkpoint(tmp_path, monkeypatch, capsys):
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the test runner was started in the background
    prepared = _signalled_trainer(tmp_path, monkeypatch, during_save=1)
    try:
        result = prepared.trainer.run()
    finally:
        prepared.release()
    assert result.stop_reason == "signal" and result.step == 3
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 3]
    assert "stopping: the step in progress finishes and its checkpoint is written; Ctrl-C again aborts without " \
           "saving" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_third_ctrl_c_aborts_and_says_nothing_was_saved(tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    prepared = _signalled_trainer(tmp_path, monkeypatch, during_save=2)
    try:
        with pytest.raises(TrainingAborted, match=r"aborted by Ctrl-C without saving at step 3; the last checkpoint "
                                                  r"is .*step_00000002 and the steps after it are lost"):
            prepared.trainer.run()
    finally:
        prepared.release()
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_double_sigint_to_a_real_process_exits_zero_with_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = _training_process(run, "--save_interval", "100000",
                             until=lambda: (run / "metrics.csv").is_file() and len(_rows(run)) >= 2)
    try:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    steps = [s for s, _ in list_checkpoints(run)]
    assert len(steps) == 1 and steps[0] >= 2 and "(signal)" in err


def test_deterministic_selects_torchs_deterministic_algorithms_for_the_run_only(tmp_path, monkeypatch):
    seen = []
    real_run = Trainer.run

    def run(self):
        seen.append((torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled(), self.data.sampler.shuffle))
        return real_run(self)

    monkeypatch.setattr(Trainer, "run", run)
    assert main(["train", *TINY, "--max_steps", "1", "--deterministic", "--run_dir", str(tmp_path / "a")]) == 0
    assert main(["train", *TINY, "--max_steps", "1", "--run_dir", str(tmp_path / "b")]) == 0
    assert seen == [(True, True, False), (False, False, True)]
    assert not torch.are_deterministic_algorithms_enabled()  # set back after the run
