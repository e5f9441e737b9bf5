"""Scenario: task parsing, class orders, relabelling tables, the MiB image filter and its caches,
on hand-made masks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ciss.data import DataError, SegDataset
from ciss.scenario import (
    GSC_ORDERS,
    Scenario,
    build_scenario,
    list_tasks,
    parse_task,
    resolve_order,
)
from ciss.types import BACKGROUND, IGNORE

# --------------------------------------------------------------------------------------------
# A dataset of hand-made 4x4 masks (5 foreground classes)
# --------------------------------------------------------------------------------------------

CLASSES = ["background", "a", "b", "c", "d", "e"]
# values present in each mask
CONTENTS = [
    {0, 1},        # 0
    {0, 1, 3},     # 1
    {0, 2},        # 2
    {0, 3, 255},   # 3
    {0, 4, 5},     # 4
    {0, 255},      # 5: nothing learnable
    {5},           # 6
    {0, 2, 4},     # 7
]


def _mask(values: set[int]) -> np.ndarray:
    vals = sorted(values)
    flat = np.array([vals[k % len(vals)] for k in range(16)], dtype=np.uint8)
    return flat.reshape(4, 4)


class ArrayDataset(SegDataset):
    name = "toy"

    def __init__(self, masks: list[np.ndarray], classes=CLASSES, split: str = "train"):
        self.masks = masks
        self.classes = list(classes)
        self.ids = [f"img{i}" for i in range(len(masks))]
        self.split = split
        self.reads = 0

    def load_image(self, i):
        m = self.masks[i]
        return np.stack([m, m, m], axis=-1)

    def load_mask(self, i):
        self.reads += 1
        return self.masks[i]


@pytest.fixture
def toy():
    return ArrayDataset([_mask(c) for c in CONTENTS])


def build(ds, task="2-1", setting="overlapped", tmp=None, **kw):
    return build_scenario(ds, task, setting, cache_dir=tmp, progress=False, **kw)


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task, sizes",
    [
        ("19-1", [20, 1]),
        ("15-5", [16, 5]),
        ("15-1", [16, 1, 1, 1, 1, 1]),
        ("15-5s", [16, 1, 1, 1, 1, 1]),
        ("10-10", [11, 10]),
        ("10-1", [11] + [1] * 10),
        ("5-3", [6] + [3] * 5),
        ("2-2", [3] + [2] * 9),
        ("10-5-5", [11, 5, 5]),
        ("offline", [21]),
    ],
)
def test_voc_tasks(task, sizes):
    steps = parse_task(task, 20)
    assert [len(s) for s in steps] == sizes
    flat = [c for s in steps for c in s]
    assert flat == list(range(21)) and steps[0][0] == BACKGROUND


@pytest.mark.parametrize(
    "task, sizes",
    [("100-50", [101, 50]), ("100-10", [101] + [10] * 5), ("100-5", [101] + [5] * 10),
     ("50-50", [51, 50, 50])],
)
def test_ade_tasks(task, sizes):
    assert [len(s) for s in parse_task(task, 150)] == sizes


@pytest.mark.parametrize("task", ["15-4", "20-1", "0-5", "15-0", "abc", "15", "15-1-1"])
def test_bad_tasks_refused(task):
    with pytest.raises(DataError, match="task"):
        parse_task(task, 20)


def test_uneven_task_message_lists_valid_steps():
    with pytest.raises(DataError, match=r"5 remain.*valid M are 1, 5"):
        parse_task("15-4", 20)


def test_list_tasks():
    assert set(["19-1", "15-5", "15-1", "10-10", "10-1", "5-3", "2-2"]) <= set(list_tasks(20))
    assert "100-50" not in list_tasks(20)
    assert set(["100-50", "100-10", "100-5", "50-50"]) <= set(list_tasks(150))
    for t in list_tasks(10):
        parse_task(t, 10)  # every listed task is valid
    assert "9-1" in list_tasks(10)


def test_explicit_groups(toy, tmp_path):
    sc = build(toy, [[2, "a"], ["e", 3], [4]], tmp=tmp_path)
    assert sc.order == (0, 2, 1, 5, 3, 4)
    assert sc.steps == ((0, 2, 1), (5, 3), (4,))
    assert sc.task.startswith("custom:")
    assert sc.class_names == ("background", "b", "a", "e", "c", "d")
    with pytest.raises(DataError, match="missing"):
        build(toy, [[1, 2], [3]], tmp=tmp_path)
    with pytest.raises(DataError, match="more than once"):
        build(toy, [[1, 2], [2, 3, 4, 5]], tmp=tmp_path)
    with pytest.raises(DataError, match="do not pass order"):
        build(toy, [[1, 2], [3, 4, 5]], tmp=tmp_path, order="random:1")


# --------------------------------------------------------------------------------------------
# Orders
# --------------------------------------------------------------------------------------------

VOC_NAMES = ["background"] + [f"c{i}" for i in range(1, 21)]


def test_gsc_orders():
    for key, order in GSC_ORDERS.items():
        assert resolve_order(key, VOC_NAMES) == order
        assert sorted(order) == list(range(21)) and order[0] == 0
    # Order B, 15-1: base = its first 16 ids, then 17, 3, 6, 18, 10 (GSC Table VI / PLOP 15-5s_b)
    steps = [[GSC_ORDERS["B"][p] for p in s] for s in parse_task("15-1", 20)]
    assert steps[1:] == [[17], [3], [6], [18], [10]]
    with pytest.raises(DataError, match="20 foreground"):
        resolve_order("C", CLASSES)


def test_random_order_is_seeded():
    a = resolve_order("random:3", VOC_NAMES)
    assert a == resolve_order("random:3", VOC_NAMES)
    assert a != resolve_order("random:4", VOC_NAMES)
    rest = list(range(1, 21))
    np.random.RandomState(3).shuffle(rest)
    assert a == (0, *rest)
    with pytest.raises(DataError, match="random:<"):
        resolve_order("random:x", VOC_NAMES)


def test_order_from_file(tmp_path):
    f = tmp_path / "order.txt"
    f.write_text("0, 3 2\nb e\n4\n")  # ids and names, commas and whitespace; "b" = 2 is a dup
    with pytest.raises(DataError, match="more than once"):
        resolve_order(f, CLASSES)
    f.write_text("0, 3 a\nb e\n4\n")
    assert resolve_order(str(f), CLASSES) == (0, 3, 1, 2, 5, 4)
    f.write_text("3 1 2 5 4")  # foreground only: background is put first
    assert resolve_order(f, CLASSES) == (0, 3, 1, 2, 5, 4)
    assert resolve_order("0,3,1, 2 e d", CLASSES) == (0, 3, 1, 2, 5, 4)  # inline, as on a CLI


@pytest.mark.parametrize(
    "order, msg",
    [
        ([0, 1, 2, 3, 4, 4], "more than once"),
        ([0, 1, 2, 3, 4], "missing"),
        ([1, 0, 2, 3, 4, 5], "background"),
        ([0, 1, 2, 3, 4, 9], "out of range"),
        (["background", "a", "b", "zzz", "d", "e"], "not a class name"),
        ("nonexistent-order-file.txt", "neither a known order"),
    ],
)
def test_invalid_orders_refused(order, msg):
    with pytest.raises(DataError, match=msg):
        resolve_order(order, CLASSES)


def test_order_changes_steps_and_labels(toy, tmp_path):
    sc = build(toy, "2-1", order=[0, 5, 4, 3, 2, 1], tmp=tmp_path)
    assert sc.steps == ((0, 5, 4), (3,), (2,), (1,))
    lut = sc.test_lut(3)
    assert [lut[v] for v in range(6)] == [0, 5, 4, 3, 2, 1]


# --------------------------------------------------------------------------------------------
# Image filter and relabelling
# --------------------------------------------------------------------------------------------


def test_overlapped_vs_disjoint(toy, tmp_path):
    ov = build(toy, "2-1", "overlapped", tmp=tmp_path)
    dj = build(toy, "2-1", "disjoint", tmp=tmp_path)
    sq = build(toy, "2-1", "sequential", tmp=tmp_path)
    assert ov.steps == ((0, 1, 2), (3,), (4,), (5,))
    assert [ov.train_indices(t).tolist() for t in range(4)] == [
        [0, 1, 2, 7], [1, 3], [4, 7], [4, 6]]
    # disjoint drops images that show a future class; 0 and 255 never (dis)qualify
    assert [dj.train_indices(t).tolist() for t in range(4)] == [[0, 2], [1, 3], [7], [4, 6]]
    assert [sq.train_indices(t).tolist() for t in range(4)] == [[0, 2], [1, 3], [7], [4, 6]]
    for sc in (ov, dj):
        for t in range(4):
            idx = sc.train_indices(t)
            assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)


def test_overlap_alias_and_bad_setting(toy, tmp_path):
    assert build(toy, "2-1", "overlap", tmp=tmp_path).setting == "overlapped"
    with pytest.raises(DataError, match="disjoint, overlapped, sequential"):
        build(toy, "2-1", "joint", tmp=tmp_path)


def test_train_and_test_luts(toy, tmp_path):
    sc = build(toy, "2-1", "overlapped", order=[0, 2, 1, 3, 4, 5], tmp=tmp_path)
    assert sc.classes_per_step == (3, 1, 1, 1)
    assert sc.labels_of_step(0) == range(0, 3) and sc.labels_of_step(2) == range(4, 5)
    for t in range(4):
        lut = sc.train_lut(t)
        assert lut.dtype == np.uint8 and lut.shape == (256,) and lut[IGNORE] == IGNORE
    # step 1 teaches raw 3 (model label 3): everything else -> background
    assert sc.train_lut(1)[[0, 1, 2, 3, 4, 5]].tolist() == [0, 0, 0, 3, 0, 0]
    # step 0 teaches raw 2 -> label 1 and raw 1 -> label 2
    assert sc.train_lut(0)[[0, 1, 2, 3, 4, 5]].tolist() == [0, 2, 1, 0, 0, 0]
    # test: seen kept, unseen -> background
    assert sc.test_lut(1)[[0, 1, 2, 3, 4, 5]].tolist() == [0, 2, 1, 3, 0, 0]
    assert sc.test_lut(3)[[0, 1, 2, 3, 4, 5]].tolist() == [0, 2, 1, 3, 4, 5]
    assert sc.test_lut(1, ignore_background=True)[0] == IGNORE
    # values that are no class are ignored rather than silently made background
    assert sc.train_lut(0)[17] == IGNORE

    seq = build(toy, "2-1", "sequential", order=[0, 2, 1, 3, 4, 5], tmp=tmp_path)
    assert seq.train_lut(2)[[0, 1, 2, 3, 4, 5]].tolist() == [0, 2, 1, 3, 4, 0]

    mask = toy.load_mask(4)  # {0, 4, 5}
    relabelled = sc.train_lut(2)[mask]
    assert set(np.unique(relabelled).tolist()) == {0, 4}


def test_step_datasets(toy, tmp_path):
    test_ds = ArrayDataset([_mask(c) for c in CONTENTS[:4]], split="val")
    sc = build(toy, "2-1", "overlapped", tmp=tmp_path, test=test_ds)
    ds = sc.train_dataset(1)
    assert len(ds) == 2
    img, lbl, idx = ds[0]
    assert isinstance(img, torch.Tensor) and img.shape == (3, 4, 4) and img.dtype == torch.float32
    assert lbl.dtype == torch.long and lbl.shape == (4, 4)
    assert idx == 1
    assert set(lbl.unique().tolist()) == {0, 3}  # raw 1 (old) became background
    assert sc.test_indices(0).tolist() == [0, 1, 2, 3]
    te = sc.test_dataset(0)
    _, lbl, _ = te[1]
    assert set(lbl.unique().tolist()) == {0, 1}  # raw 3 unseen at step 0 -> background
    # RCIL's val / test_on_val rules on the test dataset
    assert sc.val_indices(1).tolist() == [1, 3]
    assert sc.test_on_val_indices(0).tolist() == [0, 1, 2]
    assert sc.test_on_val_indices(1).tolist() == [0, 1, 2, 3]
    assert len(sc.test_dataset(1, subset="val")) == 2


def test_no_test_dataset_is_explained(toy, tmp_path):
    sc = build(toy, tmp=tmp_path)
    with pytest.raises(DataError, match="test="):
        sc.test_indices(0)
    with pytest.raises(DataError, match="test="):
        sc.val_indices(0)
    with pytest.raises(IndexError, match="steps 0..3"):
        sc.train_indices(4)


def test_as_joint(toy, tmp_path):
    sc = build(toy, "2-1", "disjoint", order=[0, 3, 2, 1, 4, 5], tmp=tmp_path)
    joint = sc.as_joint()
    assert joint.num_steps == 1 and joint.order == sc.order and joint.steps == (sc.order,)
    assert joint.train_indices(0).tolist() == [0, 1, 2, 3, 4, 6, 7]  # all but the empty image
    assert joint.train_lut(0)[[0, 1, 2, 3, 4, 5]].tolist() == [0, 3, 2, 1, 4, 5]
    assert isinstance(joint, Scenario) and joint.task == "joint"


def test_empty_step_is_refused(tmp_path):
    # every image with class 1 also shows the future class 2
    ds = ArrayDataset([_mask({0, 1, 2}), _mask({0, 2})], classes=["background", "a", "b"])
    with pytest.raises(DataError, match="step 0 .*no training image.*overlapped"):
        build(ds, [[1], [2]], "disjoint", tmp=tmp_path)


def test_scenario_is_frozen_and_hashable(toy, tmp_path):
    sc = build(toy, tmp=tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sc.task = "x"  # type: ignore[misc]
    with pytest.raises(ValueError):
        sc.train_indices(0)[0] = 5  # cached arrays are read-only
    assert hash(sc) == hash(build(toy, tmp=tmp_path))


# --------------------------------------------------------------------------------------------
# Caching
# --------------------------------------------------------------------------------------------


def test_second_build_reads_no_mask(toy, tmp_path, monkeypatch):
    first = build(toy, "2-1", "disjoint", tmp=tmp_path)
    assert toy.reads == len(toy)  # one pass: each mask read once
    assert list((tmp_path / "presence").glob("*.npy"))
    assert list((tmp_path / "scenarios").glob("*.npz"))

    def boom(self, i):
        raise AssertionError("mask read on a cached build")

    monkeypatch.setattr(ArrayDataset, "load_mask", boom)
    monkeypatch.setattr(ArrayDataset, "class_presence", boom)
    again = build(toy, "2-1", "disjoint", tmp=tmp_path)
    assert again == first
    for t in range(first.num_steps):
        assert np.array_equal(again.train_indices(t), first.train_indices(t))
    # another task / setting / order on the same dataset reuses the presence table
    other = build(toy, "3-1", "overlapped", order="random:0", tmp=tmp_path)
    assert other.num_steps == 3
    # a fresh process-level cache dir through the environment variable works too
    monkeypatch.undo()
    monkeypatch.setenv("CISS_CACHE", str(tmp_path / "env"))
    build_scenario(toy, "2-1", progress=False)
    assert list((tmp_path / "env" / "presence").glob("*.npy"))


def test_cache_keys_separate_datasets(tmp_path):
    a = ArrayDataset([_mask(c) for c in CONTENTS])
    b = ArrayDataset([_mask(c) for c in CONTENTS[:-1]])
    assert a.cache_key() != b.cache_key()
    sa, sb = build(a, tmp=tmp_path), build(b, tmp=tmp_path)
    assert sa.key != sb.key
    assert len(sb.train_indices(0)) == len(sa.train_indices(0)) - 1


def test_cache_files_written_atomically(toy, tmp_path):
    build(toy, tmp=tmp_path)
    leftovers = [p for p in tmp_path.rglob("*") if p.suffix == ".tmp"]
    assert leftovers == []


def test_bad_label_value_names_the_item(tmp_path):
    bad = ArrayDataset([_mask({0, 1}), _mask({0, 9})])
    with pytest.raises(DataError, match=r"img1.*\[9\]"):
        build(bad, [[1], [2, 3, 4, 5]], tmp=tmp_path)


def test_train_test_class_mismatch(toy, tmp_path):
    other = ArrayDataset([_mask({0, 1})], classes=["background", "x"])
    with pytest.raises(DataError, match="different classes"):
        build(toy, tmp=tmp_path, test=other)
