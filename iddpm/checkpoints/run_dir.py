"""The run directory: the only contract between training and everything after it.

```
RUN_DIR/config.json                       resolved RunConfig
RUN_DIR/checkpoints/step_00001000/        one folder per checkpoint (written atomically)
    model.safetensors                     raw weights, config in the metadata (model_file.save_model_file)
    ema_0.9999.safetensors                one per EMA rate, same format
    optimizer.safetensors                 optimizer tensors (``state.<param index>.<name>``)
    state.json                            step, optimizer param groups, sampler state, RNG states, ...
RUN_DIR/samples/step_00001000.png, RUN_DIR/metrics.csv, RUN_DIR/tb/
```
A step folder's number is the count of optimizer updates its weights have received.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from iddpm.checkpoints.model_file import read_model_file, save_model_file
from iddpm.config import ConfigError, RunConfig
from iddpm.runtime.atomic import atomic_directory, atomic_save_safetensors, atomic_write_text

CHECKPOINTS = "checkpoints"
STATE_FORMAT = "iddpm-train-state/1"
_STEP_RE = re.compile(r"^step_(\d{8,})$")


def resolve_run_dir(cfg: RunConfig, env: dict[str, str] | None = None, now: datetime | None = None) -> Path:
    """``--run_dir`` if given, else ``$OPENAI_LOGDIR`` (the original's variable), else ``runs/<timestamp>``."""
    env = os.environ if env is None else env
    if cfg.train.run_dir:
        return Path(cfg.train.run_dir)
    if env.get("OPENAI_LOGDIR"):
        return Path(env["OPENAI_LOGDIR"])
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / stamp


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a ``step_XXXXXXXX`` folder name (None for other names)."""
    m = _STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoint folders of a run, ``[(step, path)]`` by increasing step."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        step = checkpoint_step(p)
        if step is not None and p.is_dir() and (p / "model.safetensors").is_file():
            out.append((step, p))
    return sorted(out)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """Resolve a run directory (-> its latest step folder), a ``checkpoints`` folder, a step folder or a
    ``.safetensors`` file (returned as is).  Raises :class:`ConfigError` naming ``path`` otherwise."""
    p = Path(path)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ConfigError(f"{path}: not an iddpm checkpoint; give a run directory, a step folder or a .safetensors "
                              "file (convert the original's .pt files with `iddpm convert-openai`)")
        return p
    if not p.is_dir():
        raise ConfigError(f"{path}: no such file or folder")
    if (p / "model.safetensors").is_file():
        return p
    run = p.parent if p.name == CHECKPOINTS else p
    found = list_checkpoints(run)
    if not found:
        raise ConfigError(f"{path}: no checkpoints found (expected {run / CHECKPOINTS}/step_XXXXXXXX/"
                          "model.safetensors)")
    return found[-1][1]


RUN_HINT = "give a run directory, a checkpoint folder, a .safetensors model file, or an improved-diffusion .pt"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """What ``--run PATH`` names: a file (returned as is: ``.safetensors`` or the original's ``.pt``) or a folder
    (a run directory -> its latest ``checkpoints/step_*`` folder; a step folder as is).  One-line errors."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise ConfigError(f"--run {path}: no such file or directory; {RUN_HINT}")
    return p if p.is_file() else find_checkpoint(p)


def ema_files(folder: str | os.PathLike) -> dict[float, Path]:
    """``{rate: path}`` of a checkpoint folder's ``ema_<rate>.safetensors`` files."""
    out = {}
    for f in Path(folder).glob("ema_*.safetensors"):
        try:
            out[float(f.name[len("ema_"):-len(".safetensors")])] = f
        except ValueError:
            continue
    return out


def _configured_ema_rates(model_file: Path) -> tuple[float, ...]:
    """The ``--ema_rate`` list recorded in a model file's config (header only; () when unreadable)."""
    try:
        with safe_open(str(model_file), framework="pt") as f:
            meta = f.metadata() or {}
        return RunConfig.from_dict(json.loads(meta["iddpm_config"])).train.ema_rates
    except Exception:  # not an iddpm file / no config: the caller falls back to the largest rate
        return ()


def pick_weights_file(folder: str | os.PathLike, use_ema: bool = True, ema_rate: float | str | None = None) -> Path:
    """The weights file of a checkpoint folder: ``ema_<rate>.safetensors`` (EMA, default) or ``model.safetensors``.

    ``ema_rate`` None (or "") picks the only EMA file; with several, the first rate of the run's ``--ema_rate``
    list (read from the checkpoint's config), else the largest rate.
    """
    folder = Path(folder)
    if not use_ema:
        f = folder / "model.safetensors"
        if not f.is_file():
            raise ConfigError(f"--run {folder}: no model.safetensors in this checkpoint folder; {RUN_HINT}")
        return f
    emas = ema_files(folder)
    if not emas:
        if (folder / "model.safetensors").is_file():
            raise ConfigError(f"--run {folder}: no EMA weights (ema_*.safetensors) here; pass --no_ema for the raw "
                              "weights")
        raise ConfigError(f"--run {folder}: no model weights (model.safetensors / ema_*.safetensors); {RUN_HINT}")
    if ema_rate is None or ema_rate == "":
        if len(emas) == 1:
            return next(iter(emas.values()))
        for r in _configured_ema_rates(next(iter(emas.values()))):
            for have, f in emas.items():
                if abs(have - r) < 1e-12:
                    return f
        return emas[max(emas)]
    rate = float(ema_rate)
    for r, f in emas.items():
        if abs(r - rate) < 1e-12:
            return f
    have = ", ".join(str(r) for r in sorted(emas, reverse=True))
    raise ConfigError(f"--ema_rate {ema_rate}: no ema_{ema_rate}.safetensors in {folder}; available rates: {have}")


# ---------------------------------------------------------------------------------------------
# Checks before a run writes anything (one-line errors naming --run_dir)
# ---------------------------------------------------------------------------------------------
PREVIOUS_RUN_FILES = ("config.json", "metrics.csv", "tb", "samples")


def check_run_dir_path(run_dir: str | os.PathLike) -> None:
    """``--run_dir`` must be a folder or creatable as one: no regular file at it or at any of its parents."""
    p = Path(run_dir)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                where = "is a file" if q == p else f"lies under {q}, which is a file"
                raise ConfigError(f"--run_dir {run_dir}: {where}, not a folder; choose another --run_dir")
            return


def previous_run_files(run_dir: str | os.PathLike) -> list[str]:
    """The names of another run's files in ``run_dir`` (config.json, metrics.csv, tb/, samples/)."""
    return [n for n in PREVIOUS_RUN_FILES if (Path(run_dir) / n).exists()]


def check_fresh_run_dir(run_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """A new run may not write into a folder holding another run: never over checkpoints, and over its
    config.json / metrics.csv / tb / samples only with ``--overwrite``."""
    if list_checkpoints(run_dir):
        extra = (f" (--overwrite never deletes checkpoints: remove {Path(run_dir) / CHECKPOINTS} yourself to start "
                 "over)") if overwrite else ""
        raise ConfigError(f"--run_dir {run_dir}: already holds checkpoints; add --resume to continue that run "
                          f"or choose another --run_dir{extra}")
    found = previous_run_files(run_dir)
    if found and not overwrite:
        raise ConfigError(f"--run_dir {run_dir}: holds another run's {', '.join(found)} (no checkpoint); add "
                          "--overwrite to replace them or choose another --run_dir")


def check_writable(run_dir: str | os.PathLike) -> None:
    """Every folder and file a continued run writes to must be writable (one line naming the first that is not)."""
    root = Path(run_dir)
    for p in (root, root / CHECKPOINTS, root / "samples", root / "tb", root / "metrics.csv", root / ".lock"):
        if p.exists() and not os.access(p, os.W_OK | (os.X_OK if p.is_dir() else 0)):
            raise ConfigError(f"--run_dir {run_dir}: {p} is not writable (permission denied); fix its permissions "
                              "(chmod u+w) or copy the run to a folder you can write")


def clear_previous_run(run_dir: str | os.PathLike) -> list[Path]:
    """``--overwrite``: delete another run's metrics.csv, tb/ and samples/ (config.json is rewritten); never
    checkpoints.  Returns what was removed."""
    removed = []
    for name in PREVIOUS_RUN_FILES[1:]:
        p = Path(run_dir) / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        removed.append(p)
    return removed


def write_config(run_dir: str | os.PathLike, cfg: RunConfig) -> Path:
    path = Path(run_dir) / "config.json"
    atomic_write_text(path, cfg.to_json() + "\n")
    return path


def read_config(run_dir: str | os.PathLike) -> RunConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no config.json; is this an iddpm run directory?")
    return RunConfig.from_dict(json.loads(path.read_text()), source=str(path))


# ---------------------------------------------------------------------------------------------
# JSON encoding of nested state (numpy arrays / tensors become tagged lists)
# ---------------------------------------------------------------------------------------------
def to_jsonable(obj: Any) -> Any:
    """Nested dicts/lists of scalars, numpy arrays and tensors -> JSON-able (arrays tagged with dtype/shape)."""
    if isinstance(obj, torch.Tensor):
        a = obj.detach().cpu()
        return {"__tensor__": a.reshape(-1).tolist(), "dtype": str(a.dtype).replace("torch.", ""),
                "shape": list(a.shape)}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.reshape(-1).tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {"__dict_items__": [[to_jsonable(k), to_jsonable(v)] for k, v in obj.items()]} \
            if any(not isinstance(k, str) for k in obj) else {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_jsonable(v) for v in obj]}
    if isinstance(obj, list):
        return [to_jsonable(v) for v in obj]
    return obj


def from_jsonable(obj: Any) -> Any:
    """Inverse of :func:`to_jsonable`."""
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return torch.tensor(obj["__tensor__"], dtype=getattr(torch, obj["dtype"])).reshape(obj["shape"])
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"]).reshape(obj["shape"])
    if "__tuple__" in obj:
        return tuple(from_jsonable(v) for v in obj["__tuple__"])
    if "__dict_items__" in obj:
        return {from_jsonable(k): from_jsonable(v) for k, v in obj["__dict_items__"]}
    return {k: from_jsonable(v) for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------
# Optimizer state <-> (tensors, json)
# ---------------------------------------------------------------------------------------------
def split_optimizer_state(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """``optimizer.state_dict()`` -> (``{"state.<idx>.<name>": tensor}``, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, st in opt_state["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = v
            else:
                scalars.setdefault(str(idx), {})[name] = to_jsonable(v)
    return tensors, {"param_groups": to_jsonable(opt_state["param_groups"]), "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for idx, extra in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update({k: from_jsonable(v) for k, v in extra.items()})
    return {"state": state, "param_groups": from_jsonable(meta["param_groups"])}


# ---------------------------------------------------------------------------------------------
# Save / load / prune
# ---------------------------------------------------------------------------------------------
def ema_filename(rate: float) -> str:
    return f"ema_{float(rate)}.safetensors"


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns (tensors on CPU)."""

    path: Path
    model: dict[str, torch.Tensor]
    config: RunConfig
    emas: dict[float, dict[str, torch.Tensor]] = field(default_factory=dict)
    optimizer: dict | None = None
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.state.get("step", checkpoint_step(self.path) or 0))


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, cfg: RunConfig, model_state: dict[str, torch.Tensor],
                    ema_states: list[tuple[float, dict[str, torch.Tensor]]], optimizer_state: dict | None,
                    state: dict[str, Any], keep_last: int | None = None, keep_steps=()) -> Path:
    """Write ``RUN_DIR/checkpoints/step_XXXXXXXX/`` atomically, then keep the newest ``keep_last`` folders
    (and those of ``keep_steps``, e.g. the last checkpoint known to be good).

    ``state`` must be JSON-able through :func:`to_jsonable` (step, sampler state, RNG states, ...).
    """
    final = Path(run_dir) / CHECKPOINTS / step_name(step)
    meta = {"iddpm_step": str(step)}
    with atomic_directory(final) as tmp:
        save_model_file(tmp / "model.safetensors", model_state, cfg, extra_metadata=meta)
        for rate, sd in ema_states:
            save_model_file(tmp / ema_filename(rate), sd, cfg, extra_metadata={**meta, "iddpm_ema_rate": str(rate)})
        body: dict[str, Any] = {"format": STATE_FORMAT, "step": step, **state}
        if optimizer_state is not None:
            tensors, opt_meta = split_optimizer_state(optimizer_state)
            atomic_save_safetensors(tensors, tmp / "optimizer.safetensors", metadata={"iddpm_step": str(step)})
            body["optimizer"] = opt_meta
        body["config"] = cfg.to_dict()
        atomic_write_text(tmp / "state.json", _dump_state(to_jsonable(body)))
    if keep_last:
        prune_checkpoints(run_dir, keep_last, keep_steps=keep_steps)
    return final


def _dump_state(body: dict) -> str:
    """JSON with one top-level key per line (long lists such as RNG states stay on one line)."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in body.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int, keep_steps=()) -> list[Path]:
    """Delete all but the newest ``keep_last`` step folders and those of ``keep_steps`` (and stale temporary
    folders); returns the removed."""
    found = list_checkpoints(run_dir)
    keep = {int(s) for s in keep_steps if s is not None}
    removed = [p for s, p in found[:-keep_last] if s not in keep] if keep_last > 0 else []
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step_") and p.is_dir():  # leftovers of an interrupted atomic_directory
                shutil.rmtree(p, ignore_errors=True)
    return removed


def load_checkpoint(path: str | os.PathLike, *, load_training_state: bool = True) -> Checkpoint:
    """Read a checkpoint (run dir, step folder or model ``.safetensors``; see :func:`find_checkpoint`).

    A bare ``.safetensors`` file gives only the model weights and config (``optimizer`` None,
    ``state`` empty): training restarts its optimizer and EMA from those weights.
    """
    p = find_checkpoint(path)
    if p.is_file():
        sd, cfg, meta = read_model_file(p)
        state = {"step": int(meta["iddpm_step"])} if "iddpm_step" in meta else {}
        return Checkpoint(path=p, model=sd, config=cfg, state=state)
    sd, cfg, _ = read_model_file(p / "model.safetensors")
    ckpt = Checkpoint(path=p, model=sd, config=cfg)
    if not load_training_state:
        return ckpt
    for rate, f in sorted(ema_files(p).items()):
        ckpt.emas[rate] = read_model_file(f)[0]
    state_path = p / "state.json"
    if state_path.is_file():
        body = from_jsonable(json.loads(state_path.read_text()))
        if body.get("format") != STATE_FORMAT:
            raise ConfigError(f"{state_path}: unknown format {body.get('format')!r} (expected {STATE_FORMAT})")
        opt_meta = body.pop("optimizer", None)
        if opt_meta is not None and (p / "optimizer.safetensors").is_file():
            ckpt.optimizer = join_optimizer_state(load_file(str(p / "optimizer.safetensors")), opt_meta)
        ckpt.state = body
    return ckpt
