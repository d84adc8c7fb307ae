"""Exact negative log-likelihood in bits/dim over a dataset, with the original's ``calc_bpd_loop`` semantics.

For every example, ``diffusion.calc_bpd_loop`` runs t = T-1 .. 0 and returns the variational bound terms:
``vb`` (KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, the discretized-Gaussian decoder NLL at t = 0),
``xstart_mse`` and ``mse`` (eps), all in **loop order** (column k is t = T-1-k), plus ``prior_bpd`` =
KL(q(x_T|x_0) || N(0, I)) and ``total_bpd`` = sum(vb) + prior_bpd; all in bits per dimension.

:func:`compute_nll` averages these over examples and **re-indexes the per-timestep terms to ascending t**
(index t of ``vb_per_t`` is the term of diffusion step t; index 0 is the decoder term).  Unlike the
original's script (which averages per-batch means), it averages per-example values, so a short last batch
is weighted correctly.  Every random draw of example i comes from its own stream seeded by (seed, i)
(:mod:`iddpm.sample.noise`), so the result does not depend on the batch size.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from iddpm.config import ConfigError, NLLConfig, RunConfig
from iddpm.data import load_dataset, make_loader
from iddpm.runtime.atomic import atomic_write_bytes, atomic_write_text
from iddpm.sample.noise import PerSampleNoise

__all__ = ["NLLResult", "NLLShare", "compute_nll", "compute_nll_share", "merge_nll_shares", "save_nll", "nll_loader"]


def nll_loader(cfg: RunConfig, *, data_dir: str | None = None, split: str = "test", batch_size: int = 64):
    """Ordered batches (no shuffle, no flips, last batch kept) of the evaluation data for ``cfg``'s model.

    ``data_dir`` None (or "") = the run's data (the bundled digits' ``split`` for digits runs)."""
    dcfg = dataclasses.replace(cfg.data, random_flip=False)
    if data_dir:
        dcfg = dataclasses.replace(dcfg, data_dir=data_dir)
    ds = load_dataset(dcfg, cfg.model.image_size, cfg.model.in_channels, split=split,
                      with_labels=cfg.model.class_cond)
    return make_loader(ds, batch_size, shuffle=False, seed=0, drop_last=False)


@dataclass
class NLLResult:
    """Bits/dim over a dataset (means over examples; per-timestep arrays indexed by ascending t).

    bpd: mean total bits/dim (the original's ``total_bpd``).
    prior_bpd: mean prior term KL(q(x_T|x_0) || N(0,I)).
    vb_per_t: float64 (T,) mean vb term of step t (t = 0 is the decoder NLL -log p(x_0|x_1)).
    xstart_mse_per_t, mse_per_t: float64 (T,) mean x_0 / eps prediction MSE at step t.
    num_examples: examples evaluated.
    per_example_bpd: float64 (num_examples,) total bpd of each example (data order).
    timestep_map: (T,) original timestep of each (respaced) step t (``arange(T)`` when not respaced).
    """

    bpd: float
    prior_bpd: float
    vb_per_t: np.ndarray
    xstart_mse_per_t: np.ndarray
    mse_per_t: np.ndarray
    num_examples: int
    per_example_bpd: np.ndarray
    timestep_map: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    seconds: float = 0.0  # wall time of the evaluation (set by iddpm.api.nll)
    num_processes: int = 1  # processes that shared it (torchrun)

    @property
    def decoder_bpd(self) -> float:
        """The t = 0 term: discretized-Gaussian NLL of x_0 given x_1."""
        return float(self.vb_per_t[0])

    @property
    def vb_sum(self) -> float:
        """Sum of all per-step terms (bpd = vb_sum + prior_bpd)."""
        return float(self.vb_per_t.sum())

    @property
    def bpd_stderr(self) -> float:
        """Standard error of the mean total bits/dim over examples."""
        n = self.per_example_bpd.size
        return float(self.per_example_bpd.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")

    def summary(self) -> dict:
        return {
            "bpd": self.bpd,
            "bpd_stderr": self.bpd_stderr,
            "prior_bpd": self.prior_bpd,
            "decoder_bpd": self.decoder_bpd,
            "vb_sum": self.vb_sum,
            "num_examples": self.num_examples,
            "num_timesteps": int(self.vb_per_t.size),
        }


def _batches(data: Iterable) -> Iterable:
    for batch in data:
        if isinstance(batch, (tuple, list)):
            x, cond = (batch[0], batch[1] if len(batch) > 1 else {})
        else:
            x, cond = batch, {}
        yield x, (cond or {})


@dataclass
class NLLShare:
    """One process's part of an NLL evaluation (see :func:`compute_nll_share`); :func:`merge_nll_shares` joins
    the parts of all processes.

    indices: int64 (n,) data-order index of each evaluated example; per_example_bpd: float64 (n,).
    prior_sum: sum of the prior terms; vb_sum / xstart_mse_sum / mse_sum: float64 (T,) sums over the examples
    of the per-step terms, ascending t.
    """

    indices: np.ndarray
    per_example_bpd: np.ndarray
    prior_sum: float
    vb_sum: np.ndarray
    xstart_mse_sum: np.ndarray
    mse_sum: np.ndarray


@torch.no_grad()
def compute_nll_share(
    model: Callable,
    diffusion,
    data: Iterable,
    *,
    clip_denoised: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = True,
    seed: int = 0,
    max_batches: int | None = None,
    max_examples: int | None = None,
    use_labels: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> NLLShare:
    """``calc_bpd_loop`` terms of this process's share of ``data``: batch b goes to rank ``b % world_size``
    (every rank reads the same data in the same order, e.g. under ``torchrun``).  Arguments as :func:`compute_nll`.
    """
    device = torch.device(device)
    T = diffusion.num_timesteps
    totals, indices = [], []
    prior_sum = 0.0
    sums = {k: torch.zeros(T, dtype=torch.float64) for k in ("vb", "xstart_mse", "mse")}
    seen = 0
    total_hint = max_examples
    if total_hint is None and hasattr(data, "dataset"):
        try:
            total_hint = len(data.dataset)
        except TypeError:
            total_hint = None
    bar = tqdm(total=None if total_hint is None else -(-total_hint * T // world_size), disable=not progress,
               desc="nll", unit="step", unit_scale=True, leave=False)
    try:
        for b, (x, cond) in enumerate(_batches(data)):
            if max_batches is not None and b >= max_batches:
                break
            if max_examples is not None:
                if seen >= max_examples:
                    break
                x = x[: max_examples - seen]
                cond = {k: v[: max_examples - seen] for k, v in cond.items()}
            n = x.shape[0]
            if b % world_size != rank:  # another process's batch
                seen += n
                continue
            x = torch.as_tensor(x, dtype=torch.float32).to(device)
            kwargs = {k: torch.as_tensor(v).to(device) for k, v in cond.items() if use_labels or k != "y"}
            streams = PerSampleNoise(seed, range(seen, seen + n), x.shape[1:], device)

            def step_noise(streams=streams, n=n):
                for _ in range(T):
                    bar.update(n)
                    yield streams.draw()

            out = diffusion.calc_bpd_loop(model, x, clip_denoised=clip_denoised, model_kwargs=kwargs,
                                          step_noise=step_noise())
            totals.append(out["total_bpd"].double().cpu())
            indices.append(torch.arange(seen, seen + n))
            prior_sum += float(out["prior_bpd"].double().sum())
            for k in sums:  # loop order (column k is t = T-1-k) -> ascending t
                sums[k] += out[k].double().cpu().flip(1).sum(0)
            seen += n
    finally:
        bar.close()
    return NLLShare(
        indices=torch.cat(indices).numpy().astype(np.int64) if indices else np.zeros(0, np.int64),
        per_example_bpd=torch.cat(totals).numpy() if totals else np.zeros(0),
        prior_sum=prior_sum,
        vb_sum=sums["vb"].numpy(),
        xstart_mse_sum=sums["xstart_mse"].numpy(),
        mse_sum=sums["mse"].numpy(),
    )


def merge_nll_shares(shares: Iterable[NLLShare], diffusion) -> NLLResult:
    """One :class:`NLLResult` from the shares of all processes (per-example values in data order)."""
    shares = [sh for sh in shares if sh is not None]
    idx = np.concatenate([sh.indices for sh in shares])
    if not idx.size:
        raise ConfigError("nll: the dataset gave no examples (check --data_dir / --num_examples)")
    per_example = np.concatenate([sh.per_example_bpd for sh in shares])[np.argsort(idx, kind="stable")]
    n = idx.size
    T = diffusion.num_timesteps
    tmap = getattr(diffusion, "timestep_map", None)
    tmap = np.arange(T, dtype=np.int64) if tmap is None else np.asarray(torch.as_tensor(tmap).cpu(), dtype=np.int64)
    return NLLResult(
        bpd=float(per_example.mean()),
        prior_bpd=sum(sh.prior_sum for sh in shares) / n,
        vb_per_t=sum(sh.vb_sum for sh in shares) / n,
        xstart_mse_per_t=sum(sh.xstart_mse_sum for sh in shares) / n,
        mse_per_t=sum(sh.mse_sum for sh in shares) / n,
        num_examples=n,
        per_example_bpd=per_example,
        timestep_map=tmap,
    )


def compute_nll(
    model: Callable,
    diffusion,
    data: Iterable,
    *,
    clip_denoised: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = True,
    seed: int = 0,
    max_batches: int | None = None,
    max_examples: int | None = None,
    use_labels: bool = True,
) -> NLLResult:
    """Average ``calc_bpd_loop`` terms over ``data`` (one process; see :func:`compute_nll_share` for several).

    data: iterable of ``(x float [N,C,H,W] in [-1,1], cond dict)`` (e.g. :func:`iddpm.data.make_loader`);
        ``cond["y"]`` is passed to the model as ``y`` when ``use_labels`` (pass ``cfg.model.class_cond``).
    max_batches / max_examples: stop early (the last batch is truncated to ``max_examples``).
    seed: example i's noise stream is seeded by (seed, i) (i counts examples in data order).
    """
    share = compute_nll_share(model, diffusion, data, clip_denoised=clip_denoised, device=device,
                              progress=progress, seed=seed, max_batches=max_batches, max_examples=max_examples,
                              use_labels=use_labels)
    return merge_nll_shares([share], diffusion)


def save_nll(result: NLLResult, path: str | os.PathLike) -> Path:
    """Write the per-timestep terms (ascending t).

    ``.csv``: columns t, original_t, vb_bpd, xstart_mse, mse (one row per step) -- the summary goes to a
    ``<name>.json`` sidecar.  ``.npz``: arrays vb, xstart_mse, mse, t, original_t, per_example_bpd and the
    summary values as 0-d arrays.  ``.json``: the summary plus the per-step lists.
    """
    path = Path(path)
    T = result.vb_per_t.size
    t = np.arange(T)
    tmap = result.timestep_map if result.timestep_map.size == T else t
    suffix = path.suffix.lower()
    if suffix == ".csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["t", "original_t", "vb_bpd", "xstart_mse", "mse"])
        for i in range(T):
            w.writerow([i, int(tmap[i]), repr(float(result.vb_per_t[i])), repr(float(result.xstart_mse_per_t[i])),
                        repr(float(result.mse_per_t[i]))])
        atomic_write_text(path, buf.getvalue())
        atomic_write_text(path.with_suffix(".json"), json.dumps(result.summary(), indent=2) + "\n")
    elif suffix == ".npz":
        buf = io.BytesIO()
        np.savez(buf, vb=result.vb_per_t, xstart_mse=result.xstart_mse_per_t, mse=result.mse_per_t, t=t,
                 original_t=tmap, per_example_bpd=result.per_example_bpd,
                 **{k: np.asarray(v) for k, v in result.summary().items()})
        atomic_write_bytes(path, buf.getvalue())
    elif suffix == ".json":
        d = dict(result.summary(), t=t.tolist(), original_t=[int(v) for v in tmap],
                 vb_bpd=result.vb_per_t.tolist(), xstart_mse=result.xstart_mse_per_t.tolist(),
                 mse=result.mse_per_t.tolist())
        atomic_write_text(path, json.dumps(d, indent=2) + "\n")
    else:
        raise ConfigError(f"--out {path}: unknown extension {suffix!r}; use .csv, .npz or .json")
    return path


def nll_data(cfg: RunConfig, settings: NLLConfig, log: Callable[[str], None] | None = None):
    """The ordered loader of ``settings``' data for ``cfg``'s model; ``log`` gets one line saying which data."""
    source = settings.data_dir or cfg.data.data_dir or "digits"
    if log and source in ("", "digits"):
        log(f"data: bundled digits, {settings.split} split")
    elif log:
        log(f"data: {source}" + ("" if settings.data_dir else " (the run's training data; pass --data_dir for "
                                                              "held-out images)"))
    return nll_loader(cfg, data_dir=settings.data_dir or None, split=settings.split, batch_size=settings.batch_size)
