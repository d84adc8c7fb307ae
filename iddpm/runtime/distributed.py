"""The distributed context: which process this is, on which device, and the few collectives training needs.

Launched by ``torchrun`` (environment ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) the context initialises a process group (NCCL on CUDA, gloo on CPU); launched
as one plain process it is a no-op: every collective returns its input unchanged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from iddpm.config import ConfigError


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available else CPU; otherwise ``torch.device(spec)``."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"--device {spec!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: CUDA is not available here; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


@dataclass(frozen=True)
class DistContext:
    """Rank, world size and device of this process.  ``world_size == 1`` -> every method is a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group

    @property
    def is_main(self) -> bool:
        """True on the process that does all file and console I/O (rank 0)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None and self.world_size > 1

    def barrier(self) -> None:
        if self.is_distributed:
            tdist.barrier()

    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (in place)."""
        if not self.is_distributed:
            return
        for t in list(module.parameters()) + list(module.buffers()):
            tdist.broadcast(t.data, src=0)

    def any_flag(self, flag: bool) -> bool:
        """True when ``flag`` is set on any rank (all ranks get the same answer)."""
        if not self.is_distributed:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` (a one-element list for one process)."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``DistributedDataParallel(module)`` when distributed, else ``module`` itself."""
        if not self.is_distributed:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, output_device=ids[0] if ids else None)

    def shutdown(self) -> None:
        if self.is_distributed and tdist.is_initialized():
            tdist.destroy_process_group()


def init_distributed(device: str = "auto", env: Mapping[str, str] | None = None) -> DistContext:
    """Read the torchrun environment and initialise the process group (once per process).

    Args:
        device: ``--device`` (auto, cpu, cuda, cuda:N).  Under torchrun with CUDA each rank uses
            ``cuda:<LOCAL_RANK>``.
        env: the environment (default ``os.environ``).
    Returns:
        the :class:`DistContext`; for ``WORLD_SIZE`` unset or 1 no process group is created.
    """
    env = os.environ if env is None else env
    world_size = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistContext(0, 1, 0, dev, None)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        kwargs: dict[str, Any] = {}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        tdist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistContext(rank, world_size, local_rank, dev, backend)


@contextlib.contextmanager
def distributed_context(device: str = "auto") -> Iterator[DistContext]:
    """:func:`init_distributed` for the length of one command.

    The process group is destroyed afterwards only if this call created it, so a caller that set up its own
    group (e.g. a torchrun training script that samples) keeps it.
    """
    created = not tdist.is_initialized()
    ctx = init_distributed(device)
    try:
        yield ctx
    finally:
        if created:
            ctx.shutdown()
