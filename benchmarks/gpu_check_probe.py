"""NCCL probe run by ``benchmarks/gpu_check.py`` under ``torchrun``: collectives and one DDP step on CUDA.

Usage (what the check runs)::

    python -m torch.distributed.run --nproc_per_node N benchmarks/gpu_check_probe.py OUT.json

With one GPU, iddpm itself never creates a process group (its distributed context is a no-op for one process,
and NCCL refuses two ranks on one GPU), so this probe is what exercises NCCL there: ``init_process_group`` with
``device_id``, all_reduce, broadcast, all_gather_object, barrier, and a ``DistributedDataParallel`` step whose
gradient must equal the mean of the ranks' gradients.  Rank 0 writes a JSON verdict to OUT.json.  Without CUDA
it runs the same on gloo and the CPU (a dry run of the probe itself; the check runs it only on CUDA).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def _nccl_version() -> str:
    if not torch.cuda.is_available():
        return "none (gloo dry run)"
    v = torch.cuda.nccl.version()  # a tuple on current torch, an int (e.g. 2708) on old ones
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def probe() -> dict:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        t = torch.full((4,), float(rank + 1), device=device)
        dist.all_reduce(t)
        reduce_ok = bool((t == world * (world + 1) / 2).all())
        b = torch.full((3,), float(rank), device=device)
        dist.broadcast(b, src=0)
        objs: list = [None] * world
        dist.all_gather_object(objs, {"rank": rank})
        torch.manual_seed(0)
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(torch.nn.Linear(8, 4).to(device), device_ids=ids)
        x = torch.full((2, 8), float(rank + 1), device=device)
        net(x).sum().backward()
        # d(sum(Wx + b))/dW = column sums of x = 2 * (rank + 1) per entry; DDP averages over ranks
        expect = 2 * sum(r + 1 for r in range(world)) / world
        ddp_ok = bool(torch.allclose(net.module.weight.grad, torch.full_like(net.module.weight.grad, expect)))
        dist.barrier()
        return {"ok": reduce_ok and bool((b == 0).all()) and [o["rank"] for o in objs] == list(range(world))
                and ddp_ok, "world_size": world, "all_reduce": reduce_ok, "ddp_grad": ddp_ok,
                "nccl_version": _nccl_version(), "backend": dist.get_backend()}
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    result = probe()
    if int(os.environ.get("RANK", "0")) == 0:
        with open(argv[0], "w") as f:
            json.dump(result, f)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
