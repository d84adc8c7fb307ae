"""make_loader: batch layout, sharding across ranks, determinism, infinite cycling and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iddpm.config import ConfigError, DataConfig
from iddpm.data import load_dataset, make_loader


@pytest.fixture()
def labelled(tmp_path):
    # image i has every pixel == i so batches reveal their indices
    n = 37
    imgs = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None], 16, 1).reshape(n, 4, 4)
    np.savez(tmp_path / "d.npz", imgs, np.arange(n) % 5)
    return load_dataset(DataConfig(data_dir=str(tmp_path / "d.npz")), 4, 1)


def _ids(x):
    return [int(v) for v in torch.round((x[:, 0, 0, 0] + 1) * 127.5)]


def test_batches_layout(labelled):
    loader = make_loader(labelled, 8, shuffle=True, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 37 // 8
    x, cond = batches[0]
    assert x.shape == (8, 1, 4, 4) and x.dtype == torch.float32
    assert cond["y"].shape == (8,) and cond["y"].dtype == torch.int64
    assert [int(v) for v in cond["y"]] == [i % 5 for i in _ids(x)]
    seen = sum((_ids(b[0]) for b in batches), [])
    assert len(set(seen)) == 32  # no repeats inside an epoch
    tail = list(make_loader(labelled, 8, shuffle=False, seed=0, drop_last=False))
    assert [len(b[0]) for b in tail] == [8, 8, 8, 8, 5]
    assert sum((_ids(b[0]) for b in tail), []) == list(range(37))


def test_two_ranks_disjoint_and_covering(labelled):
    per_rank = []
    for rank in range(2):
        loader = make_loader(labelled, 3, shuffle=True, seed=7, rank=rank, world_size=2, drop_last=False)
        per_rank.append(sum((_ids(b[0]) for b in loader), []))
    assert len(per_rank[0]) == len(per_rank[1]) == 19  # 37 padded to 38 by DistributedSampler
    union = set(per_rank[0]) | set(per_rank[1])
    assert union == set(range(37))
    overlap = set(per_rank[0]) & set(per_rank[1])
    assert len(overlap) <= 1  # only the single padding index may repeat
    # without padding: 36 images split exactly in two disjoint halves
    ds36 = torch.utils.data.Subset(labelled, range(36))
    a, b = (sum((_ids(x) for x, _ in make_loader(ds36, 6, shuffle=True, seed=1, rank=r, world_size=2)), [])
            for r in range(2))
    assert set(a).isdisjoint(b) and sorted(a + b) == list(range(36))


def test_determinism_by_seed_and_epochs(labelled):
    def first_epochs(seed, n=3):
        loader = make_loader(labelled, 4, shuffle=True, seed=seed, infinite=True)
        it = iter(loader)
        return [_ids(next(it)[0]) for _ in range(n * len(loader))]

    state = torch.random.get_rng_state()
    a, b, c = first_epochs(0), first_epochs(0), first_epochs(1)
    assert torch.equal(state, torch.random.get_rng_state())  # no global RNG consumed
    assert a == b and a != c
    nb = 37 // 4
    assert a[:nb] != a[nb : 2 * nb]  # a new order each epoch


def test_infinite_resume_continues_exactly(labelled):
    full = make_loader(labelled, 5, shuffle=True, seed=3, infinite=True)
    it = iter(full)
    straight = [_ids(next(it)[0]) for _ in range(20)]
    part = make_loader(labelled, 5, shuffle=True, seed=3, infinite=True)
    it = iter(part)
    first = [_ids(next(it)[0]) for _ in range(9)]
    state = part.state_dict()
    assert state == {"epoch": 1, "batch": 2}
    resumed = make_loader(labelled, 5, shuffle=True, seed=3, infinite=True)
    resumed.load_state_dict(state)
    it = iter(resumed)
    rest = [_ids(next(it)[0]) for _ in range(11)]
    assert first + rest == straight


def test_workers_match_main_process(labelled):
    a = [_ids(x) for x, _ in make_loader(labelled, 6, shuffle=True, seed=2)]
    b = [_ids(x) for x, _ in make_loader(labelled, 6, shuffle=True, seed=2, num_workers=2)]
    assert a == b


def test_batch_too_large(labelled):
    with pytest.raises(ConfigError, match="batch_size"):
        make_loader(labelled, 64, shuffle=True, seed=0)


def test_random_flip_through_loader_follows_epoch(tmp_path):
    # asymmetric images: a flip is visible; the loader passes (index, epoch) so flips change per epoch
    n = 12
    imgs = np.zeros((n, 4, 4), np.uint8)
    imgs[:, :, 0] = 200
    imgs[:, 0, 1] = np.arange(n)  # identifies the image
    np.savez(tmp_path / "f.npz", imgs)
    ds = load_dataset(DataConfig(data_dir=str(tmp_path / "f.npz"), random_flip=True), 4, 1, seed=9)
    loader = make_loader(ds, 4, shuffle=False, seed=0, infinite=True)
    it = iter(loader)
    epochs = []
    for _ in range(3):
        flipped = {}
        for _ in range(len(loader)):
            x, _ = next(it)
            for img in x[:, 0]:
                is_flipped = bool(img[0, -1] > 0)  # the bright column moved to the right
                idx = int(round((float(img[0, 2 if is_flipped else 1]) + 1) * 127.5))
                flipped[idx] = is_flipped
        epochs.append([flipped[i] for i in range(n)])
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
    from iddpm.data.dataset import flip_decision

    assert epochs == [[flip_decision(9, e, i) for i in range(n)] for e in range(3)]
