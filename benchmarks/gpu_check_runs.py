"""Whole-run checks of ``benchmarks/gpu_check.py``: ``iddpm train`` / ``iddpm sample`` under ``torchrun``, the NCCL
probe, batch-size invariance of sampling, and exact resume with ``--deterministic``.

The CLI runs are subprocesses (what users run); they use the small U-Net of :mod:`gpu_check_lib`, whose
compiled graphs the in-process checks have usually put in inductor's on-disk cache already.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from gpu_check_lib import SMALL, Check, cli_flags, init_state, is_cuda, small_config, verdict
from safetensors.torch import load_file

from iddpm.api import load_run
from iddpm.build import build_model, build_sampling_diffusion
from iddpm.models import optimize
from iddpm.sample import generate

PROBE = Path(__file__).resolve().parent / "gpu_check_probe.py"
# Exact resume needs deterministic kernels on CUDA: iddpm's --deterministic only fixes the data order, so the
# runs are launched with torch's deterministic mode (and the cuBLAS workspace setting it requires).
DETERMINISTIC_LAUNCH = ("import sys, torch; torch.use_deterministic_algorithms(True); "
                        "from iddpm.cli.main import main; sys.exit(main(sys.argv[1:]))")
SAMPLE_ARGS = ["--num_samples", "8", "--timestep_respacing", "10", "--seed", "3", "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(device) -> dict[str, str]:
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8")
    env.pop("OPENAI_LOGDIR", None)
    if not is_cuda(device):
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def torchrun(nproc: int, *target: str) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node N ... <target>`` on a free local port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(_free_port()), *target]


def run(cmd: list[str], device, timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd``; a non-zero exit raises with the last lines of its stderr (the one-line error iddpm prints)."""
    r = subprocess.run(cmd, env=_env(device), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"exit {r.returncode}: {tail[-600:]}")
    return r


def train_flags(device, small: dict, precision: str) -> list[str]:
    return cli_flags({**SMALL, **small}) + ["--precision", precision, "--device", torch.device(device).type,
                                            "--log_interval", "1", "--no_progress"]


def nproc_for(device) -> int:
    """Processes for the torchrun checks: 2 when two GPUs exist (real NCCL traffic in iddpm), else 1."""
    return min(2, torch.cuda.device_count()) if is_cuda(device) else 1


def sample_images(model, diffusion, cfg, batch_size: int, seed: int, device) -> np.ndarray:
    """8 uint8 samples through the fast path, as ``iddpm sample`` draws them (``optimize``; compiled on CUDA)."""
    m = cfg.model
    return generate(optimize(model, "sample"), diffusion, num_samples=8, batch_size=batch_size,
                    image_shape=(m.in_channels, m.image_size, m.image_size), seed=seed,
                    num_classes=m.num_classes if m.class_cond else None, device=device, progress=False).images


def images_match(a: np.ndarray, b: np.ndarray) -> tuple[bool, str]:
    """Equal up to the network's round-off across batch shapes: at most +-1 on < 1% of the uint8 values
    (the criterion of tests/helpers.assert_same_images)."""
    if a.shape != b.shape:
        return False, f"shapes {a.shape} vs {b.shape}"
    d = np.abs(a.astype(np.int64) - b.astype(np.int64))
    return bool(d.max() <= 1 and (d > 0).mean() < 0.01), f"max diff {d.max()}, {100 * (d > 0).mean():.2f}% differ"


# ------------------------------------------------------------------------------------------------
# torchrun: train, sample, NCCL probe
# ------------------------------------------------------------------------------------------------
def torchrun_train_check(device, workdir: Path, small: dict, precision: str, timeout: float = 420) -> Check:
    """``torchrun -m iddpm train`` (3 steps, fast path: compiled on CUDA) writes a checkpoint with finite losses."""
    nproc = nproc_for(device)
    run_dir = workdir / "torchrun_train"
    run(torchrun(nproc, "-m", "iddpm", "train", *train_flags(device, small, precision), "--max_steps", "3",
                 "--run_dir", str(run_dir)), device, timeout)
    state = json.loads((run_dir / "checkpoints" / "step_00000003" / "state.json").read_text())
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    loss = float(last[header.index("loss")])
    ok = state["world_size"] == nproc and len(set(state["param_sha1"])) == 1 and np.isfinite(loss) and len(rows) >= 2
    note = "" if nproc > 1 else "; one process: iddpm makes no process group (NCCL: see the probe)"
    return verdict("distributed", f"torchrun x{nproc} iddpm train {precision}", ok,
                   f"3 steps, checkpoint written, last loss {loss:.4f}, world_size {state['world_size']}{note}",
                   run_dir=str(run_dir))


def torchrun_sample_check(device, workdir: Path, timeout: float = 300) -> Check:
    """``torchrun -m iddpm sample`` from the trained run gives the images of an in-process sample of batch 8."""
    run_dir = workdir / "torchrun_train"
    if not (run_dir / "checkpoints").is_dir():
        return Check("distributed", "torchrun iddpm sample", "skip", "skipped: the torchrun train check wrote no run")
    out = workdir / "torchrun_sample"
    nproc = nproc_for(device)
    run(torchrun(nproc, "-m", "iddpm", "sample", "--model_path", str(run_dir), *SAMPLE_ARGS, "--batch_size", "4",
                 "--device", torch.device(device).type, "--out", str(out)), device, timeout)
    got = np.load(next(out.glob("samples_*.npz")))["arr_0"]
    model, diffusion, cfg = load_run(run_dir, device=device, timestep_respacing="10")
    ref = sample_images(model, diffusion, cfg, 8, 3, device)
    ok, how = images_match(got, ref)
    return verdict("distributed", f"torchrun x{nproc} iddpm sample", ok,
                   f"8 samples (batch 4) vs in-process batch 8: {how}")


def nccl_probe_check(device, workdir: Path, timeout: float = 180) -> Check:
    if not is_cuda(device):
        return Check("distributed", "NCCL probe (collectives + DDP)", "skip", "skipped: no CUDA")
    out = workdir / "nccl_probe.json"
    nproc = nproc_for(device)
    run(torchrun(nproc, str(PROBE), str(out)), device, timeout)
    res = json.loads(out.read_text())
    ok = bool(res["ok"]) and res["backend"] == "nccl"
    return verdict("distributed", f"NCCL probe x{nproc} (collectives + DDP)", ok,
                   f"backend {res['backend']}, NCCL {res['nccl_version']}, all_reduce {res['all_reduce']}, "
                   f"DDP grad {res['ddp_grad']}", **res)


# ------------------------------------------------------------------------------------------------
# sampling: same seed -> same images whatever the batch size
# ------------------------------------------------------------------------------------------------
def batch_invariance_check(device, small: dict | None = None, steps: int = 10) -> Check:
    """:func:`iddpm.sample.generate` on ``device`` (fast path; compiled on CUDA) with batch 8, 4 and 8 again: the
    batch-4 images equal the batch-8 ones up to round-off, and a repeat of batch 8 is bit-identical (``steps``
    respaced ancestral steps)."""
    cfg = small_config(**(small or {}))
    model = build_model(cfg)
    model.load_state_dict(init_state(cfg))
    model.to(device).eval()
    diffusion = build_sampling_diffusion(cfg, str(steps))
    runs = [sample_images(model, diffusion, cfg, b, 5, device) for b in (8, 4, 8)]
    ok, how = images_match(runs[1], runs[0])
    repeat = bool(np.array_equal(runs[2], runs[0]))
    spread = int(runs[0].max()) - int(runs[0].min())  # guards against a trivially constant output
    return verdict("sampling", "same seed, batch 8 vs 4", ok and repeat and spread > 10,
                   f"{how}; batch 8 repeated bit-identical: {repeat}", repeat_identical=repeat)


# ------------------------------------------------------------------------------------------------
# exact resume
# ------------------------------------------------------------------------------------------------
def _checkpoint_files(step_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {f.name: load_file(str(f)) for f in sorted(step_dir.glob("*.safetensors"))}


def resume_check(device, workdir: Path, small: dict, precision: str, timeout: float = 420) -> Check:
    """Train 4 steps straight vs 2 + resume to 4 (``--deterministic``, deterministic kernels): every tensor of the
    step-4 checkpoint (model, EMA, optimizer) and the saved step/sampler/data/RNG/loss-scale state are identical."""
    flags = train_flags(device, small, precision) + ["--deterministic", "True", "--save_interval", "2"]
    launch = [sys.executable, "-c", DETERMINISTIC_LAUNCH, "train"]
    straight, split = workdir / "resume_straight", workdir / "resume_split"
    run(launch + flags + ["--run_dir", str(straight), "--max_steps", "4"], device, timeout)
    run(launch + flags + ["--run_dir", str(split), "--max_steps", "2"], device, timeout)
    run(launch + ["--resume", "--run_dir", str(split), "--max_steps", "4", "--no_progress"], device, timeout)
    a = _checkpoint_files(straight / "checkpoints" / "step_00000004")
    b = _checkpoint_files(split / "checkpoints" / "step_00000004")
    diffs = [f"{name}:{k}" for name in a for k in a[name] if not torch.equal(a[name][k], b.get(name, {}).get(k,
                                                                                                     torch.empty(0)))]
    same_files = sorted(a) == sorted(b) and len(a) >= 3
    sa, sb = (json.loads((d / "checkpoints" / "step_00000004" / "state.json").read_text()) for d in (straight, split))
    state_diff = [k for k in ("step", "sampler", "data", "rng", "scaler") if sa.get(k) != sb.get(k)]
    mid = load_file(str(split / "checkpoints" / "step_00000002" / "model.safetensors"))
    trained = any(not torch.equal(mid[k], b["model.safetensors"][k]) for k in mid)  # the resumed steps did update
    ok = same_files and not diffs and not state_diff and trained
    detail = (f"{sum(len(v) for v in a.values())} tensors in {len(a)} files; differing tensors {len(diffs)}"
              f"{' e.g. ' + diffs[0] if diffs else ''}; differing state {state_diff or 'none'}; "
              f"resumed steps updated weights: {trained}")
    return verdict("resume", f"exact resume {precision} (2 + 2 = 4 steps)", ok, detail, differing=diffs[:20],
                   state_diff=state_diff)
