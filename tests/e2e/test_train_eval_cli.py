"""``iddpm train --eval_every``: eval.csv, metrics.csv and TensorBoard rows, the kept best checkpoint, ``iddpm plot``;
eval.csv and the best checkpoint stay consistent over SIGTERM + ``--resume``; under torchrun (2 CPU processes) the
evaluation gives the numbers of one process."""

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY_TRAIN_FLAGS
from PIL import Image

from iddpm import api
from iddpm.build import build_model
from iddpm.checkpoints.run_dir import list_checkpoints, load_checkpoint, read_config
from iddpm.cli.main import main
from iddpm.eval.report import read_eval_csv
from iddpm.runtime import DistContext, MultiSink
from iddpm.train.ema import EMA
from iddpm.train.evaluation import PeriodicEvaluator, prepare_evaluation

# no attention layers: the quickest steps
TINY = [*TINY_TRAIN_FLAGS, "--in_channels", "1", "--attention_resolutions", "", "--batch_size", "4", "--lr", "1e-3",
        "--log_interval", "1"]
EVAL = ["--eval_every", "2", "--eval_samples", "16", "--eval_steps", "4", "--eval_batch_size", "8"]
METRICS = ("fid", "fid_se", "kid", "kid_std", "precision", "recall")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("OPENAI_LOGDIR", None)
    return env


def _numbers(rows):
    """eval.csv rows without their timings."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "wall_time")} for r in rows]


def _best(rows, rate):
    mine = [r for r in rows if r["ema_rate"] == rate]
    return min(mine, key=lambda r: float(r["fid"]))


def test_eval_rows_best_checkpoint_and_plot(tmp_path, capsys):
    torch.set_num_threads(1)
    run = tmp_path / "run"
    assert main(["train", *TINY, *EVAL, "--max_steps", "5", "--ema_rate", "0.9,0.99", "--keep_best",
                 "--save_interval", "1", "--keep_last", "1", "--run_dir", str(run)]) == 0
    err = capsys.readouterr().err
    assert "eval step 2 EMA 0.9: FID " in err and "(16 samples, ancestral 4 steps, digits-cnn;" in err
    rows = read_eval_csv(run / "eval.csv")
    # every 2 steps and at the end (step 5), one row per EMA rate
    assert [(r["step"], r["ema_rate"]) for r in rows] == [(s, e) for s in ("2", "4", "5") for e in ("0.9", "0.99")]
    assert all(float(r["fid"]) > 0 and float(r["fid_se"]) > 0 and r["num_samples"] == "16" for r in rows)
    metrics = list(csv.DictReader(io.StringIO((run / "metrics.csv").read_text())))
    fid_rows = [(r["step"], float(r["eval/fid_ema_0.9"])) for r in metrics if r.get("eval/fid_ema_0.9")]
    assert fid_rows == [(r["step"], float(r["fid"])) for r in rows if r["ema_rate"] == "0.9"]
    # the best checkpoint of each rate is kept besides the last ones (--keep_last 1 pruned steps 1-3)
    steps = [s for s, _ in list_checkpoints(run)]
    assert steps[-1] == 5 and 1 not in steps and 2 not in steps
    state = json.loads((run / "checkpoints" / "step_00000005" / "state.json").read_text())
    for rate in ("0.9", "0.99"):
        best, folder = _best(rows, rate), run / "checkpoints" / f"best_ema_{rate}"
        assert state["eval"]["best"][rate] == {"step": int(best["step"]), "fid": float(best["fid"]),
                                               "fid_se": float(best["fid_se"]), "path": f"checkpoints/best_ema_{rate}"}
        info = json.loads((folder / "state.json").read_text())
        assert info["step"] == int(best["step"]) and info["best"]["fid"] == float(best["fid"])
        model, _, _ = api.load_run(folder, device="cpu")  # a checkpoint folder like the others
        assert torch.equal(next(iter(model.state_dict().values())), load_checkpoint(folder).emas[float(rate)][
            next(iter(model.state_dict()))])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # why: slow to import

    tb = EventAccumulator(str(run / "tb"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("eval/fid_ema_0.99")] == [2, 4, 5]
    assert main(["plot", str(run)]) == 0
    png = Image.open(run / "report.png")
    assert png.size[0] >= 1000 and png.size[1] >= 700


@pytest.mark.slow
def test_sigterm_and_resume_keep_eval_rows_and_best_consistent(tmp_path):
    torch.set_num_threads(1)
    straight, split = tmp_path / "straight", tmp_path / "split"
    flags = [*TINY, *EVAL, "--keep_best", "--ema_rate", "0.9"]
    assert main(["train", *flags, "--max_steps", "8", "--run_dir", str(straight)]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "iddpm", "train", *flags, "--run_dir", str(split)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # stop it once two evaluations are in eval.csv (no step limit: only the signal ends it)
        deadline = time.time() + 180
        while time.time() < deadline and len(read_eval_csv(split / "eval.csv")) < 2:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "(signal)" in err, err[-2000:]
    stopped = load_checkpoint(split).step
    assert stopped >= 4 and stopped < 8
    assert main(["train", "--resume", "--run_dir", str(split), "--max_steps", "8", "--no_progress"]) == 0
    a, b = read_eval_csv(straight / "eval.csv"), read_eval_csv(split / "eval.csv")
    assert [r["step"] for r in b] == ["2", "4", "6", "8"]  # no row lost or repeated
    assert _numbers(a) == _numbers(b)  # exact resume: the same weights, so the same numbers
    sa, sb = (json.loads((d / "checkpoints" / "step_00000008" / "state.json").read_text()) for d in (straight, split))
    assert sa["eval"] == sb["eval"] and sb["eval"]["best"]["0.9"]["step"] == int(_best(b, "0.9")["step"])
    best = json.loads((split / "checkpoints" / "best_ema_0.9" / "state.json").read_text())
    assert best["step"] == sb["eval"]["best"]["0.9"]["step"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_evaluate_like_one(tmp_path):
    """torchrun trains and evaluates with 2 CPU processes (each samples every other batch of 4, here with the
    DPM-Solver++ 2M solver); one process
    evaluating the same checkpoint's EMA weights gives the same numbers (the same batches, hence bit-identical
    images and features)."""
    torch.set_num_threads(1)
    run = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "iddpm", "train", *TINY, "--batch_size", "8", "--class_cond",
           "True", "--num_classes", "10", "--max_steps", "2", "--save_interval", "2", "--ema_rate", "0.9",
           "--eval_every", "2", "--eval_samples", "20", "--eval_batch_size", "4", "--eval_steps", "4",
           "--eval_sampler", "dpm++2m",
           "--run_dir", str(run)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = read_eval_csv(run / "eval.csv")
    assert len(two) == 1 and two[0]["num_samples"] == "20"

    cfg, ckpt = read_config(run), load_checkpoint(run)
    model = build_model(cfg)  # the run's network with the checkpoint's weights: what the evaluator reads of a Trainer
    model.load_state_dict(ckpt.model)
    ema = EMA(model, cfg.train.ema_rates)
    ema.load_state_dict(0, ckpt.emas[0.9])
    weights = SimpleNamespace(model=model, ema=ema, step=ckpt.step, sinks=MultiSink())
    one_dir = tmp_path / "one"
    one_dir.mkdir()
    dist = DistContext()
    PeriodicEvaluator(cfg, prepare_evaluation(cfg, dist.device), run_dir=one_dir, dist=dist).run(weights)
    one = read_eval_csv(one_dir / "eval.csv")
    assert _numbers(one) == _numbers(two)
    assert all(float(one[0][k]) == float(two[0][k]) for k in METRICS)
