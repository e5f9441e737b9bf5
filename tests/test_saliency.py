"""Saliency for SSUL's unknown class: deterministic, cached on disk, overridden by a user folder, and
carried through the training augmentation by the unknown mark."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

import ciss.saliency
from ciss.data import DataError, SyntheticDataset
from ciss.data.transforms import TrainTransform
from ciss.methods.ssul import UNKNOWN_MARK, mark_unknown
from ciss.saliency import SaliencyMaps, detect, detector_key, list_detectors
from ciss.types import IGNORE

pytest.importorskip("cv2", reason="saliency detectors need opencv-contrib-python-headless")


@pytest.fixture(scope="module")
def data():
    return SyntheticDataset("train", num_classes=4, size=48, length=6)


def _refuse(*args, **kwargs):
    raise AssertionError("the detector ran although a map was available")


def test_detectors_are_deterministic_and_find_a_bright_square():
    image = np.full((60, 80, 3), 40, dtype=np.uint8)
    image[20:40, 30:50] = (250, 30, 30)  # one vivid object on a flat background
    for name in list_detectors():
        a, b = detect(image, name), detect(image.copy(), name)
        assert a.shape == (60, 80) and a.dtype == bool
        assert np.array_equal(a, b)
        # salient pixels sit on the object (spectral residual favours its corners and edges)
        assert a.any() and a[8:52, 18:62].sum() > 0.9 * a.sum(), name
    assert detect(image, "fine_grained")[25:35, 35:45].mean() > 0.5
    assert not detect(np.zeros((16, 16, 3), np.uint8)).any()  # nothing stands out on a blank image


def test_maps_are_identical_across_caches(data, tmp_path):
    a = SaliencyMaps(data, cache_dir=tmp_path / "a")
    b = SaliencyMaps(data, cache_dir=tmp_path / "b")
    for i in range(len(data)):
        assert np.array_equal(a(i), b(i))


def test_second_call_reads_the_cache(data, tmp_path, monkeypatch):
    maps = SaliencyMaps(data, detector="spectral_residual", cache_dir=tmp_path)
    first = maps(2)
    path = maps.cache_path(2)
    assert path.is_file()
    # keyed by dataset cache_key, detector and image id
    assert data.cache_key() in str(path) and detector_key("spectral_residual") in str(path)
    monkeypatch.setattr(ciss.saliency, "detect", _refuse)
    assert np.array_equal(SaliencyMaps(data, detector="spectral_residual", cache_dir=tmp_path)(2), first)
    # another detector is another cache entry: it must compute, so it meets the refusing stub
    with pytest.raises(AssertionError, match="detector ran"):
        SaliencyMaps(data, detector="fine_grained", cache_dir=tmp_path)(2)


def test_cache_dir_defaults_to_env(data, tmp_path, monkeypatch):
    monkeypatch.setenv("CISS_CACHE", str(tmp_path))
    maps = SaliencyMaps(data)
    maps(0)
    assert maps.cache_path(0).is_file() and tmp_path in maps.cache_path(0).parents


def test_user_folder_wins(data, tmp_path, monkeypatch):
    folder = tmp_path / "sal"
    folder.mkdir()
    h, w = data.load_image(1).shape[:2]
    user = np.zeros((h, w), np.uint8)
    user[:, : w // 2] = 200  # > 127: salient
    user[0, -1] = 127  # not salient (threshold is > 127)
    Image.fromarray(user).save(folder / f"{data.ids[1]}.png")
    monkeypatch.setattr(ciss.saliency, "detect", _refuse)
    maps = SaliencyMaps(data, cache_dir=tmp_path / "cache", saliency_dir=folder)
    assert np.array_equal(maps(1), user > 127)
    assert maps.key.startswith("dir-")
    with pytest.raises(DataError, match="missing"):
        maps(0)
    with pytest.raises(DataError, match="not a folder"):
        SaliencyMaps(data, saliency_dir=tmp_path / "nope")


def test_user_maps_of_another_size_are_resized(data, tmp_path):
    h, w = data.load_image(0).shape[:2]
    Image.fromarray(np.full((h // 2, w // 2), 255, np.uint8)).save(tmp_path / f"{data.ids[0]}.png")
    assert SaliencyMaps(data, saliency_dir=tmp_path)(0).shape == (h, w)


def test_unknown_mark_survives_the_training_transform():
    label = np.zeros((40, 50), np.uint8)
    label[5:15, 5:20] = 3  # a current class
    salient = np.zeros((40, 50), bool)
    salient[20:35, 10:45] = True
    salient[5:15, 5:20] = True  # salient, but labelled: stays the class
    marked = mark_unknown(label, salient)
    assert (marked == UNKNOWN_MARK).sum() == 15 * 35 and (marked == 3).sum() == 150
    image = np.zeros((40, 50, 3), np.uint8)
    image[..., 0] = np.where(marked == UNKNOWN_MARK, 255, 0)  # the image carries the same region

    # geometry without resampling (flip + pad): the mark moves exactly with the image
    t = TrainTransform(64, scale=(1.0, 1.0), rng=random.Random(0))
    img, lbl = t(image, marked)
    assert set(lbl.unique().tolist()) == {0, 3, UNKNOWN_MARK, IGNORE}
    assert (lbl == UNKNOWN_MARK).sum() == 15 * 35
    assert bool((img[0][lbl == UNKNOWN_MARK] > 1.0).all()) and bool((img[0][lbl == 0] < 0).all())

    # random scale + crop: nearest keeps the value, never blends it into a class
    for seed in range(5):
        img, lbl = TrainTransform(32, rng=random.Random(seed))(image, marked)
        assert set(lbl.unique().tolist()) <= {0, 3, UNKNOWN_MARK, IGNORE}
        mark = lbl == UNKNOWN_MARK
        if mark.any():  # the image is bilinear: check the mark's interior agrees with it
            assert (img[0][mark] > 0).float().mean() > 0.9
