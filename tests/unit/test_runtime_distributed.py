"""The distributed context is a no-op for one process and resolves devices with clear errors."""

import pytest
import torch

from iddpm.config import ConfigError
from iddpm.runtime import DistContext, init_distributed, resolve_device


def test_single_process_context_is_noop():
    ctx = init_distributed("cpu", env={})
    assert (ctx.rank, ctx.world_size, ctx.backend) == (0, 1, None)
    assert ctx.is_main and not ctx.is_distributed
    m = torch.nn.Linear(2, 2)
    assert ctx.wrap(m) is m
    assert ctx.any_flag(True) is True and ctx.any_flag(False) is False
    assert ctx.all_gather_object({"a": 1}) == [{"a": 1}]
    before = m.weight.detach().clone()
    ctx.broadcast_module(m)
    ctx.barrier()
    assert torch.equal(before, m.weight)


def test_world_size_one_under_torchrun_env_needs_no_process_group():
    ctx = init_distributed("cpu", env={"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"})
    assert ctx.backend is None and not torch.distributed.is_initialized()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="--device cuda"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="--device"):
        resolve_device("nonsense")


def test_context_is_frozen():
    ctx = DistContext()
    with pytest.raises(AttributeError):
        ctx.rank = 3
