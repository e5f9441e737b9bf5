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


def known(scenario, t):
    """Step t's images with the labels step t's masks give them (what a method knows without a
    model; the classes of other steps are background there)."""
    lut = scenario.train_lut(t)
    out = []
    for i in scenario.train_indices(t).tolist():
        held = set(np.unique(lut[scenario.train_data.load_mask(i)]).tolist()) - {0, 255}
        out.append((i, sorted(held)))
    return out


def fg(scenario, t):
    return range(1, len(scenario.seen_classes(t)))


def test_class_balanced_after_each_step(scenario):
    mem = ExemplarMemory(size=20, seed=0)
    pool: set[int] = set()
    for t in range(scenario.num_steps):
        pool |= set(scenario.train_indices(t).tolist())
        mem.update(known(scenario, t), fg(scenario, t), t)
        assert len(mem) == 20
        assert set(mem.indices.tolist()) <= pool  # only images some step trained on
        assert np.all(np.diff(mem.indices) > 0)
        counts = mem.class_counts(fg(scenario, t))
        # round-robin: each seen class got size // |seen| images holding it (or more, by
        # co-occurrence)
        assert min(counts.values()) >= 20 // len(fg(scenario, t))
        assert set(mem.steps.tolist()) <= set(range(t + 1))


def test_balance_is_over_what_each_candidate_is_known_to_hold():
    # class 3 is known only on image 7: a memory of 3 over classes 1-3 must take image 7
    cands = [(0, [1]), (1, [1]), (2, [2]), (3, [2]), (7, [3]), (8, [1, 2])]
    for seed in range(5):
        mem = ExemplarMemory(size=3, seed=seed)
        mem.update(cands, [1, 2, 3], step=0)
        assert 7 in mem.indices.tolist()
        assert all(v >= 1 for v in mem.class_counts([1, 2, 3]).values())
    # a class no candidate is known to hold gets nothing, and the memory does not loop forever
    mem = ExemplarMemory(size=10)
    mem.update([(0, [1]), (1, [])], [1, 2], step=0)
    assert mem.indices.tolist() == [0]


def test_stored_images_keep_the_classes_they_were_taken_with():
    mem = ExemplarMemory(size=2, seed=0)
    mem.update([(0, [1]), (1, [2])], [1, 2], step=0)
    assert mem.classes == [[1], [2]]
    # step 1 offers image 0 again, now seen as class 3: the stored entry (class 1, step 0) wins,
    # so class 3 can only be found on image 5
    mem.size = 3
    mem.update([(0, [3]), (5, [3])], [1, 2, 3], step=1)
    assert mem.indices.tolist() == [0, 1, 5]
    assert mem.classes == [[1], [2], [3]] and mem.steps.tolist() == [0, 0, 1]


def test_random_sampling_ignores_classes():
    cands = [(i, [1]) for i in range(20)] + [(99, [2])]
    hits = 0
    for seed in range(10):
        bal = ExemplarMemory(size=2, seed=seed)
        bal.update(cands, [1, 2], step=0)
        assert 99 in bal.indices.tolist()  # class 2's only image
        rnd = ExemplarMemory(size=2, seed=seed, sampling="random")
        rnd.update(cands, [1, 2], step=0)
        assert len(rnd) == 2
        hits += 99 in rnd.indices.tolist()
    assert hits < 10  # drawn at random, class 2 is often left out
    with pytest.raises(DataError, match="sampling"):
        ExemplarMemory(sampling="herding")


def test_at_least_one_per_class_when_size_allows(scenario):
    mem = ExemplarMemory(size=5)
    mem.update(known(scenario, 0), fg(scenario, 0), 0)  # 5 seen classes, 5 slots
    assert all(v >= 1 for v in mem.class_counts(range(1, 6)).values())
    small = ExemplarMemory(size=3)
    small.update(known(scenario, 0), fg(scenario, 0), 0)
    assert len(small) == 3
    empty = ExemplarMemory(size=0)
    empty.update(known(scenario, 0), fg(scenario, 0), 0)
    assert len(empty) == 0


def test_memory_is_kept_across_steps(scenario):
    mem = ExemplarMemory(size=12, seed=1)
    mem.update(known(scenario, 0), fg(scenario, 0), 0)
    before = set(mem.indices.tolist())
    mem.update(known(scenario, 1), fg(scenario, 1), 1)
    after = set(mem.indices.tolist())
    step1 = set(scenario.train_indices(1).tolist())
    kept_old = after - step1
    assert kept_old and kept_old <= before | step1  # old exemplars survive next to new ones
    assert mem.class_counts([6])[6] >= 2


def test_deterministic(scenario):
    a, b = ExemplarMemory(10, seed=4), ExemplarMemory(10, seed=4)
    for t in range(2):
        a.update(known(scenario, t), fg(scenario, t), t)
        b.update(known(scenario, t), fg(scenario, t), t)
    assert a.indices.tolist() == b.indices.tolist()


def test_state_round_trip(scenario):
    mem = ExemplarMemory(size=8, seed=2)
    ids = scenario.train_data.ids
    mem.update(known(scenario, 0), fg(scenario, 0), 0, ids)
    mem.update(known(scenario, 1), fg(scenario, 1), 1, ids)
    state = mem.state_dict()
    json.dumps(state)  # plain ints / strings only
    torch.save(state, "/dev/null")
    other = ExemplarMemory()
    other.load_state_dict(state)
    assert other.indices.tolist() == mem.indices.tolist() and other.classes == mem.classes
    assert other.steps.tolist() == mem.steps.tolist() and other.size == 8
    other.check_ids(ids)
    with pytest.raises(DataError, match="ids do not match"):
        other.check_ids(list(reversed(ids)))
    with pytest.raises(DataError, match="missing"):
        other.load_state_dict({"size": 3})
    old_version = {k: v for k, v in state.items() if k != "classes"}
    with pytest.raises(DataError, match="classes"):
        other.load_state_dict(old_version)


def test_memory_dataset_uses_all_seen_labels(scenario):
    mem = ExemplarMemory(size=10)
    mem.update(known(scenario, 0), fg(scenario, 0), 0)
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
    mem.update(known(scenario, 0), fg(scenario, 0), 0)
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
