"""Synthetic dataset: determinism, splits, class co-occurrence and balance."""

from __future__ import annotations

import numpy as np
import pytest

from ciss.data import DataError, SyntheticDataset, build_dataset
from ciss.scenario import build_scenario


def test_shapes_and_classes():
    ds = build_dataset("synthetic", "train", num_classes=10, size=(48, 64), length=5)
    assert len(ds) == 5 and ds.has_images and ds.ids[0] == "train-00000"
    assert len(ds.classes) == 11 and ds.classes[0] == "background"
    assert len(set(ds.classes)) == 11  # descriptive and unique, e.g. "red-solid-disc"
    img, mask = ds[0]
    assert img.shape == (48, 64, 3) and img.dtype == np.uint8
    assert mask.shape == (48, 64) and mask.dtype == np.uint8
    assert mask.max() <= 10 and 255 not in mask


def test_defaults():
    tr, va = SyntheticDataset("train"), SyntheticDataset("val")
    assert (len(tr), len(va)) == (200, 60)
    assert tr.size == (64, 64) and tr.num_classes == 10


def test_deterministic_per_item():
    a = SyntheticDataset("train", seed=3, length=8)
    b = SyntheticDataset("train", seed=3, length=50)  # length does not change items
    for i in (0, 5, 7):
        ia, ma = a[i]
        ib, mb = b[i]
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb)
        assert np.array_equal(a.load_mask(i), ma)  # mask alone == mask of the full render
        assert np.array_equal(a.load_image(i), ia)
    # item order does not matter (own RNG per item)
    assert np.array_equal(a[3][0], SyntheticDataset("train", seed=3, length=8)[3][0])


def test_seed_and_split_change_pixels():
    a = SyntheticDataset("train", seed=0, length=4)
    assert not np.array_equal(a[0][0], SyntheticDataset("train", seed=1, length=4)[0][0])
    assert not np.array_equal(a[0][0], SyntheticDataset("val", seed=0, length=4)[0][0])
    assert a.cache_key() != SyntheticDataset("train", seed=1, length=4).cache_key()
    assert a.cache_key() != SyntheticDataset("train", seed=0, length=4, size=32).cache_key()


def test_classes_cooccur_and_are_balanced():
    ds = SyntheticDataset("train", num_classes=10)
    present = np.stack([ds.class_presence(i) for i in range(len(ds))])  # (N, 256)
    fg = present[:, 1:11]
    per_image = fg.sum(1)
    assert per_image.min() >= 1  # every image teaches something
    assert (per_image >= 2).mean() > 0.4  # co-occurrence: background shift really happens
    counts = fg.sum(0)
    assert counts.min() >= 20 and counts.max() <= 3 * counts.min()


def test_every_step_has_images_in_small_tasks(tmp_path):
    ds = SyntheticDataset("train", num_classes=10)
    for task in ("5-1", "6-2", "9-1"):
        for setting in ("overlapped", "disjoint"):
            sc = build_scenario(ds, task, setting, cache_dir=tmp_path, progress=False)
            assert all(len(sc.train_indices(t)) > 0 for t in range(sc.num_steps))


def test_twenty_classes_supported_and_limits():
    ds = SyntheticDataset("train", num_classes=20, length=3)
    assert len(ds.classes) == 21
    with pytest.raises(DataError, match="1..20"):
        SyntheticDataset("train", num_classes=21)
    with pytest.raises(DataError, match="size"):
        SyntheticDataset("train", size=8)


def test_background_is_cluttered():
    img, mask = SyntheticDataset("train", length=2)[0]
    bg = img[mask == 0].astype(float)
    assert bg.std() > 5  # noise and blobs, not a flat colour
