"""Exemplar memory: SSUL-M class balance, persistence across steps, state round trip, mixing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ciss.data import DataError, ExemplarMemory, MixedBatchSampler, SyntheticDataset, with_memory
from ciss.scenario import build_scenario


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    ds = SyntheticDataset("train", num_classes=10, size=32)
    return build_scenario(ds, "5-1", "overlapped", cache_dir=tmp_path_factory.mktemp("cache"),
                          progress=False)


def test_class_balanced_after_each_step(scenario):
    mem = ExemplarMemory(size=20, seed=0)
    pool: set[int] = set()
    for t in range(scenario.num_steps):
        pool |= set(scenario.train_indices(t).tolist())
        mem.update(scenario, t)
        seen = [c for c in scenario.seen_classes(t) if c != 0]
        assert len(mem) == 20
        assert set(mem.indices.tolist()) <= pool  # only images some step trained on
        assert np.all(np.diff(mem.indices) > 0)
        counts = mem.class_counts(scenario.train_presence, seen)
        # round-robin: each seen class got size // |seen| images holding it (or more, by
        # co-occurrence)
        assert min(counts.values()) >= 20 // len(seen)
        assert set(mem.steps.tolist()) <= set(range(t + 1))


def test_at_least_one_per_class_when_size_allows(scenario):
    mem = ExemplarMemory(size=5)
    mem.update(scenario, 0)  # 5 seen classes, 5 slots
    counts = mem.class_counts(scenario.train_presence, range(1, 6))
    assert all(v >= 1 for v in counts.values())
    small = ExemplarMemory(size=3)
    small.update(scenario, 0)
    assert len(small) == 3
    empty = ExemplarMemory(size=0)
    empty.update(scenario, 0)
    assert len(empty) == 0


def test_memory_is_kept_across_steps(scenario):
    mem = ExemplarMemory(size=12, seed=1)
    mem.update(scenario, 0)
    before = set(mem.indices.tolist())
    mem.update(scenario, 1)
    after = set(mem.indices.tolist())
    step1 = set(scenario.train_indices(1).tolist())
    kept_old = after - step1
    assert kept_old and kept_old <= before | step1  # old exemplars survive next to new ones
    assert mem.class_counts(scenario.train_presence, [6])[6] >= 2


def test_deterministic(scenario):
    a, b = ExemplarMemory(10, seed=4), ExemplarMemory(10, seed=4)
    for t in range(2):
        a.update(scenario, t)
        b.update(scenario, t)
    assert a.indices.tolist() == b.indices.tolist()


def test_state_round_trip(scenario):
    mem = ExemplarMemory(size=8, seed=2)
    mem.update(scenario, 0)
    mem.update(scenario, 1)
    state = mem.state_dict()
    json.dumps(state)  # plain ints / strings only
    torch.save(state, "/dev/null")
    other = ExemplarMemory()
    other.load_state_dict(state)
    assert other.indices.tolist() == mem.indices.tolist()
    assert other.steps.tolist() == mem.steps.tolist() and other.size == 8
    other.check_ids(scenario.train_data.ids)
    with pytest.raises(DataError, match="ids do not match"):
        other.check_ids(list(reversed(scenario.train_data.ids)))
    with pytest.raises(DataError, match="missing"):
        other.load_state_dict({"size": 3})


def test_memory_dataset_uses_all_seen_labels(scenario):
    mem = ExemplarMemory(size=10)
    mem.update(scenario, 0)
    ds = mem.dataset(scenario, 1)
    lut = scenario.test_lut(1)
    for k in range(3):
        img, lbl, idx = ds[k]
        raw = scenario.train_data.load_mask(idx)
        assert torch.equal(lbl, torch.from_numpy(lut[raw]).long())
        assert img.shape == (3, 32, 32)


def test_mixed_batches_half_memory(scenario):
    current = scenario.train_dataset(1)
    mem = ExemplarMemory(size=6)
    mem.update(scenario, 0)
    ds, sampler = with_memory(current, mem.dataset(scenario, 1), batch_size=8, seed=0)
    batches = list(sampler)
    n_cur = len(current)
    assert len(batches) == len(sampler) == -(-n_cur // 4)
    cur_seen = sorted(i for b in batches for i in b if i < n_cur)
    assert cur_seen == list(range(n_cur))  # each current image once per epoch
    for b in batches[:-1]:
        assert sum(i >= n_cur for i in b) == 4 and len(b) == 8
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler)
    img, lbl, idx = next(iter(loader))
    assert img.shape == (8, 3, 32, 32) and lbl.shape == (8, 32, 32)
    assert list(sampler) != batches  # next epoch reshuffles
    plain = MixedBatchSampler(10, 0, batch_size=4)
    assert [len(b) for b in plain] == [4, 4, 2]
    assert len(MixedBatchSampler(10, 0, batch_size=4, drop_last=True)) == 2
