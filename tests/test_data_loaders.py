"""VOC, ADE20K and Cityscapes loaders on tiny fixtures written into tmp_path, and the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ciss.data import (
    ADE20K_CLASSES,
    CITY_ORDER,
    CITYSCAPES_CLASSES,
    VOC_CLASSES,
    DataError,
    SegDataset,
    build_dataset,
    list_datasets,
)
from ciss.scenario import build_scenario
from ciss.types import IGNORE


def _png(path: Path, arr: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)


def _jpg(path: Path, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 90, dtype=np.uint8)).save(path)


# ---- registry ---------------------------------------------------------------------------------


def test_registry():
    assert list_datasets() == ["ade20k", "cityscapes", "folder", "synthetic", "voc"]
    with pytest.raises(DataError, match="valid names: ade20k, cityscapes, folder, synthetic, voc"):
        build_dataset("pascal")
    for name in ("voc", "ade20k", "cityscapes", "folder"):
        with pytest.raises(DataError, match="needs a root"):
            build_dataset(name, "train")
    with pytest.raises(DataError, match="num_classes, size, length, seed"):
        build_dataset("synthetic", "train", num_class=5)


@pytest.mark.parametrize("name", ["synthetic"])
def test_contract_across_registry(name):
    ds = build_dataset(name, "train", length=3)
    assert isinstance(ds, SegDataset)
    assert isinstance(ds.name, str) and ds.split == "train" and len(ds.ids) == len(ds) == 3
    img, mask = ds[0]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert mask.dtype == np.uint8 and mask.shape == img.shape[:2]
    assert isinstance(ds.cache_key(), str) and ds.cache_key() == ds.cache_key()


# ---- VOC -------------------------------------------------------------------------------------

VOC_IDS = ["2007_000032", "2007_000039", "2008_000123"]


def _voc(root: Path, list_style: str = "list", images: bool = False) -> Path:
    for k, id_ in enumerate(VOC_IDS):
        lbl = np.zeros((6, 8), dtype=np.uint8)
        lbl[1:3, 1:4] = k + 1
        lbl[0, 0] = 255
        im = Image.fromarray(lbl, mode="P")
        im.putpalette([0, 0, 0] + [128, 0, 0] * 255)  # colours unrelated to indices
        (root / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
        im.save(root / "SegmentationClassAug" / f"{id_}.png")
        if images:
            _jpg(root / "JPEGImages" / f"{id_}.jpg", 6, 8)
    if list_style == "list":
        (root / "list").mkdir()
        # the published lists: CRLF, no leading slash
        lines = "".join(f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png\r\n" for i in VOC_IDS)
        (root / "list" / "train_aug.txt").write_bytes(lines[: len(lines)].encode())
        (root / "list" / "val.txt").write_bytes(lines.splitlines(True)[0].encode())
    else:
        d = root / "ImageSets" / "Segmentation"
        d.mkdir(parents=True)
        (d / "train_aug.txt").write_text("\n".join(VOC_IDS) + "\n")
        (d / "val.txt").write_text(VOC_IDS[2] + "\n")
    return root


def test_voc_lists_and_labels_only(tmp_path):
    ds = build_dataset("voc", "train", _voc(tmp_path))
    assert ds.ids == VOC_IDS  # nothing stripped from "JPEGImages/..." nor a trailing "\r"
    assert ds.classes == VOC_CLASSES and len(ds.classes) == 21
    assert not ds.has_images
    mask = ds.load_mask(1)
    assert set(np.unique(mask).tolist()) == {0, 2, 255}  # palette indices, not colours
    with pytest.raises(DataError, match="no images.*JPEGImages"):
        ds.load_image(0)
    assert build_dataset("voc", "val", tmp_path).ids == VOC_IDS[:1]
    with pytest.raises(DataError, match="valid splits"):
        build_dataset("voc", "test", tmp_path)


def test_voc_imagesets_layout_with_images(tmp_path):
    ds = build_dataset("voc", "train", _voc(tmp_path, "imagesets", images=True))
    assert ds.ids == VOC_IDS and ds.has_images
    img, mask = ds[2]
    assert img.shape == (6, 8, 3) and mask.shape == (6, 8)
    assert build_dataset("voc", "val", tmp_path).ids == [VOC_IDS[2]]


def test_voc_missing_pieces(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset("voc", "train", tmp_path / "none")
    root = _voc(tmp_path / "a")
    (root / "SegmentationClassAug" / f"{VOC_IDS[1]}.png").unlink()
    with pytest.raises(DataError, match="1 label file.*missing.*2007_000039"):
        build_dataset("voc", "train", root)
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="train_aug.txt"):
        build_dataset("voc", "train", tmp_path / "b")


def test_voc_presence_and_scenario(tmp_path):
    ds = build_dataset("voc", "train", _voc(tmp_path))
    assert np.flatnonzero(ds.class_presence(2)).tolist() == [0, 3, 255]
    sc = build_scenario(ds, [[1, 2], [3] + list(range(4, 21))], "disjoint",
                        cache_dir=tmp_path / "c", progress=False)
    assert sc.train_indices(0).tolist() == [0, 1] and sc.train_indices(1).tolist() == [2]


# ---- ADE20K ----------------------------------------------------------------------------------


def _ade(root: Path, images: bool = True) -> Path:
    base = root / "ADEChallengeData2016"
    for sub, ids in (("training", ["ADE_train_00000002", "ADE_train_00000001"]),
                     ("validation", ["ADE_val_00000001"])):
        for k, id_ in enumerate(ids):
            lbl = np.zeros((5, 7), dtype=np.uint8)
            lbl[2:, 3:] = 150 - k
            lbl[0, 0] = 13
            _png(base / "annotations" / sub / f"{id_}.png", lbl)
            if images:
                _jpg(base / "images" / sub / f"{id_}.jpg", 5, 7)
    return root


def test_ade20k(tmp_path):
    root = _ade(tmp_path)
    ds = build_dataset("ade20k", "train", root)  # parent of ADEChallengeData2016 is accepted
    assert ds.ids == ["ADE_train_00000001", "ADE_train_00000002"]  # sorted
    assert len(ds.classes) == 151 and ds.classes[0] == "background"
    assert ds.classes[13] == "person" and ds.classes[150] == "flag"
    assert ds.background_is_void and ds.has_images
    img, mask = ds[0]
    assert img.shape == (5, 7, 3) and set(np.unique(mask).tolist()) == {0, 13, 149}
    val = build_dataset("ade20k", "val", root / "ADEChallengeData2016")
    assert val.ids == ["ADE_val_00000001"]
    sc = build_scenario(ds, "100-50", cache_dir=tmp_path / "c", progress=False)
    assert sc.background_is_void and sc.num_steps == 2
    assert sc.train_indices(1).tolist() == [0, 1]
    assert sc.test_lut(1, ignore_background=True)[0] == IGNORE
    assert ADE20K_CLASSES[1] == "wall"


def test_ade20k_labels_only_and_errors(tmp_path):
    root = _ade(tmp_path / "a", images=False)
    ds = build_dataset("ade20k", "train", root)
    assert not ds.has_images
    with pytest.raises(DataError, match="no images"):
        ds.load_image(0)
    with pytest.raises(DataError, match="annotations"):
        build_dataset("ade20k", "train", tmp_path / "empty")
    with pytest.raises(DataError, match="valid splits"):
        build_dataset("ade20k", "test", root)


# ---- Cityscapes ------------------------------------------------------------------------------

TRAIN_CITIES = [c for c in CITY_ORDER if c not in ("frankfurt", "lindau", "munster")]


def _cityscapes(root: Path, per_city: int = 5, images: bool = True) -> Path:
    for sub, cities in (("train", TRAIN_CITIES), ("val", ["frankfurt", "lindau", "munster"])):
        for city in cities:
            for k in range(per_city):
                id_ = f"{city}_{k:06d}_000019"
                lbl = np.zeros((4, 6), dtype=np.uint8)  # labelId 0: unlabeled -> 255
                lbl[1, :] = 7   # road -> 0
                lbl[2, :] = 26  # car -> 13
                lbl[3, :3] = 33  # bicycle -> 18
                _png(root / "gtFine" / sub / city / f"{id_}_gtFine_labelIds.png", lbl)
                if images:
                    path = root / "leftImg8bit" / sub / city / f"{id_}_leftImg8bit.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(path)
    return root


def test_cityscapes_mapping_and_cities(tmp_path):
    root = _cityscapes(tmp_path, per_city=2)
    ds = build_dataset("cityscapes", "train", root)
    assert ds.classes == CITYSCAPES_CLASSES and len(ds.classes) == 19
    assert not ds.has_background
    assert len(ds) == 36 and sorted(set(ds.cities)) == sorted(TRAIN_CITIES)
    assert ds.ids[0] == "aachen_000000_000019" and ds.cities[0] == "aachen"
    img, mask = ds[0]
    assert img.shape == (4, 6, 3)
    assert mask[0].tolist() == [IGNORE] * 6 and mask[1, 0] == 0 and mask[2, 0] == 13
    assert mask[3, 0] == 18
    assert np.flatnonzero(ds.class_presence(0)).tolist() == [0, 13, 18, 255]
    pool = build_dataset("cityscapes", "trainval", root)
    assert len(pool) == 42 and pool.cities[-1] == "munster"  # train images, then val images
    with pytest.raises(DataError, match="no background class.*11-5"):
        build_scenario(ds, [[1, 2], [3]], cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(DataError, match="split='trainval'"):
        build_scenario(ds, "11-5", cache_dir=tmp_path / "c", progress=False)


@pytest.mark.parametrize("task, sizes", [("11-5", [11, 5, 5]), ("11-1", [11] + [1] * 10),
                                         ("1-1", [1] * 21)])
def test_cityscapes_domain_tasks(tmp_path, task, sizes):
    pool = build_dataset("cityscapes", "trainval", _cityscapes(tmp_path, per_city=5))
    sc = build_scenario(pool, task, cache_dir=tmp_path / "c", progress=False)
    assert [len(d) for d in sc.domains] == sizes
    assert sc.domains[0][0] == "aachen" and sc.domains[-1][-1] == "munster"  # PLOP's city order
    assert sc.classes_per_step == (19,) + (0,) * (len(sizes) - 1)
    assert sc.setting == "sequential" and not sc.has_background
    seen: set[str] = set()
    for t, doms in enumerate(sc.domains):
        seen |= set(doms)
        train = sc.train_indices(t)
        assert {pool.cities[i] for i in train} <= set(doms)
        # PLOP: 80% of the step's images for training, 20% of all seen cities' images for test
        assert len(train) == int(0.8 * 5 * len(doms))
        test = sc.test_indices(t)
        n_seen = 5 * len(seen)
        assert len(test) == n_seen - int(0.8 * n_seen)
        assert {pool.cities[i] for i in test} <= seen
        assert np.array_equal(sc.train_lut(t)[:19], np.arange(19))  # classes never relabelled
        assert np.array_equal(sc.test_lut(t)[:19], np.arange(19))
    joint = sc.as_joint()
    assert len(joint.train_indices(0)) == int(0.8 * len(pool))
    with pytest.raises(DataError, match="11-5"):
        build_scenario(pool, "10-5", cache_dir=tmp_path / "c", progress=False)
