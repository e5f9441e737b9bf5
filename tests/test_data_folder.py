"""Folder format: loading, and one named DataError per kind of broken input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ciss.data import DataError, FolderDataset, build_dataset
from ciss.scenario import build_scenario

CLASSES = ["background", "cat", "dog"]


def write_folder(root: Path, n: int = 4, size=(8, 6), ext: str = ".jpg") -> Path:
    """A valid folder dataset: ids 000..00n, label i holds background and class (i % 2) + 1."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "splits").mkdir()
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    w, h = size
    ids = [f"{i:03d}" for i in range(n)]
    for i, id_ in enumerate(ids):
        img = np.full((h, w, 3), 40 * i, dtype=np.uint8)
        Image.fromarray(img).save(root / "images" / f"{id_}{ext}")
        lbl = np.zeros((h, w), dtype=np.uint8)
        lbl[: h // 2] = (i % 2) + 1
        lbl[-1, -1] = 255
        Image.fromarray(lbl, mode="L").save(root / "labels" / f"{id_}.png")
    (root / "splits" / "train.txt").write_text("\n".join(ids[:3]) + "\n")
    (root / "splits" / "val.txt").write_text(ids[3] + "\n")
    return root


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "data")


def test_loads_valid_folder(folder):
    ds = build_dataset("folder", "train", folder)
    assert isinstance(ds, FolderDataset)
    assert ds.classes == CLASSES and ds.ids == ["000", "001", "002"] and len(ds) == 3
    img, mask = ds[1]
    assert img.shape == (6, 8, 3) and img.dtype == np.uint8
    assert mask.shape == (6, 8) and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) == {0, 2, 255}
    assert ds.has_images
    ds.validate(full=True)
    assert build_dataset("folder", "val", folder).ids == ["003"]
    assert ds.cache_key().startswith("folder-train-3-")


def test_png_images_and_palette_labels(tmp_path):
    root = write_folder(tmp_path / "d", ext=".png")
    # rewrite one label as a palette PNG whose colours differ from its indices
    lbl = np.zeros((6, 8), dtype=np.uint8)
    lbl[2:4] = 2
    im = Image.fromarray(lbl, mode="P")
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [7] * (253 * 3))
    im.save(root / "labels" / "000.png")
    ds = FolderDataset(root, "train")
    assert set(np.unique(ds.load_mask(0)).tolist()) == {0, 2}  # index values, not colours
    assert ds.class_presence(0)[[0, 2]].all()


def test_cache_key_changes_when_a_label_is_edited_not_when_touched(folder):
    import os
    key = FolderDataset(folder).cache_key()
    lbl = folder / "labels" / "000.png"
    st = lbl.stat()
    os.utime(lbl, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a copy: new mtime, same bytes
    assert FolderDataset(folder).cache_key() == key
    Image.fromarray(np.ones((6, 8), dtype=np.uint8), mode="L").save(lbl)
    assert FolderDataset(folder).cache_key() != key


# ---- every kind of broken input gives one DataError that names the file ----------------------


def _err(root, split="train") -> str:
    with pytest.raises(DataError) as e:
        FolderDataset(root, split)
    return str(e.value)


def test_missing_root(tmp_path):
    msg = _err(tmp_path / "nope")
    assert "nope" in msg and "does not exist" in msg


def test_root_required():
    with pytest.raises(DataError, match="needs a root"):
        build_dataset("folder", "train")


def test_missing_classes_txt(folder):
    (folder / "classes.txt").unlink()
    msg = _err(folder)
    assert "classes.txt" in msg and "missing" in msg


def test_bad_classes_txt(folder):
    (folder / "classes.txt").write_text("background\n\ncat\n")
    assert "line 2 is empty" in _err(folder)
    (folder / "classes.txt").write_text("background\ncat\ncat\n")
    assert "unique" in _err(folder)
    (folder / "classes.txt").write_text("background\n")
    assert "at least one" in _err(folder)


def test_missing_split_file(folder):
    msg = _err(folder, "test")
    assert "test.txt" in msg and "available splits: train, val" in msg


def test_empty_split(folder):
    (folder / "splits" / "train.txt").write_text("\n  \n# just a comment\n")
    msg = _err(folder)
    assert "train.txt" in msg and "no image ids" in msg


def test_duplicate_id_in_split(folder):
    (folder / "splits" / "train.txt").write_text("000\n001\n000\n")
    assert "appears on lines 1 and 3" in _err(folder)


def test_missing_image(folder):
    (folder / "images" / "001.jpg").unlink()
    msg = _err(folder)
    assert "train.txt" in msg and "001" in msg and "no image" in msg


def test_missing_label(folder):
    (folder / "labels" / "002.png").unlink()
    msg = _err(folder)
    assert "002" in msg and "no label" in msg and "labels" in msg


def test_size_mismatch(folder):
    Image.fromarray(np.zeros((5, 8), dtype=np.uint8), mode="L").save(folder / "labels" / "001.png")
    msg = _err(folder)
    assert "001.png" in msg and "8x5" in msg and "8x6" in msg


def test_unreadable_image(folder):
    (folder / "images" / "000.jpg").write_bytes(b"not a jpeg at all")
    msg = _err(folder)
    assert "000.jpg" in msg and "cannot read" in msg


def test_unreadable_label(folder):
    (folder / "labels" / "000.png").write_bytes(b"\x89PNG garbage")
    msg = _err(folder)
    assert "000.png" in msg and "cannot read" in msg


def test_truncated_label_is_caught_when_decoding(folder):
    path = folder / "labels" / "000.png"
    big = np.random.default_rng(0).integers(0, 3, (120, 160)).astype(np.uint8)
    Image.fromarray(big, mode="L").save(path)
    Image.fromarray(np.zeros((120, 160, 3), np.uint8)).save(folder / "images" / "000.jpg")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut
    ds = FolderDataset(folder)
    with pytest.raises(DataError, match="000.png"):
        ds.validate(full=True)


def test_rgb_label_rejected(folder):
    Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(folder / "labels" / "001.png")
    msg = _err(folder)
    assert "001.png" in msg and "single-channel index PNGs" in msg and "RGB" in msg


def test_16bit_label_rejected(folder):
    Image.fromarray(np.zeros((6, 8), dtype=np.uint16)).save(folder / "labels" / "001.png")
    assert "8-bit single-channel" in _err(folder)


def test_bad_label_value_found_by_validate_and_by_scenario(folder, tmp_path):
    lbl = np.zeros((6, 8), dtype=np.uint8)
    lbl[0, 0] = 7  # only 0..2 and 255 are valid
    Image.fromarray(lbl, mode="L").save(folder / "labels" / "002.png")
    ds = FolderDataset(folder)  # headers are fine
    with pytest.raises(DataError, match=r"002\.png.*\[7\].*classes\.txt"):
        ds.validate(full=True)
    with pytest.raises(DataError, match=r"002\.png.*\[7\]"):
        build_scenario(ds, "1-1", cache_dir=tmp_path / "cache", progress=False)


def test_check_files_can_be_skipped(folder):
    Image.fromarray(np.zeros((5, 8), dtype=np.uint8), mode="L").save(folder / "labels" / "001.png")
    ds = build_dataset("folder", "train", folder, check_files=False)
    with pytest.raises(DataError, match="8x5"):
        ds.validate(full=False)


def test_ambiguous_image_extension(folder):
    Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(folder / "images" / "000.png")
    assert "several files" in _err(folder)


def test_labels_renumbered_into_a_given_class_list_by_name(folder):
    target = ["background", "person", "Dog ", "car", "cat"]
    ds = build_dataset("folder", "train", folder, classes=target)
    assert ds.classes == target and ds.own_classes == CLASSES
    # image 1 holds its own value 2 (dog) -> 2 in target; image 0 holds 1 (cat) -> 4
    assert set(np.unique(ds.load_mask(1)).tolist()) == {0, 2, 255}
    assert set(np.unique(ds.load_mask(0)).tolist()) == {0, 4, 255}
    assert ds.class_presence(0)[[0, 4, 255]].all() and not ds.class_presence(0)[1]
    assert ds.cache_key() != FolderDataset(folder).cache_key()
    with pytest.raises(DataError, match="not among the classes"):
        build_dataset("folder", "train", folder, classes=["background", "cat"])


def test_renumbered_labels_still_refuse_values_outside_classes_txt(folder):
    lbl = np.zeros((6, 8), dtype=np.uint8)
    lbl[0, 0] = 3  # classes.txt has 0..2; 3 exists in the target list but not in this folder
    Image.fromarray(lbl, mode="L").save(folder / "labels" / "000.png")
    ds = build_dataset("folder", "train", folder, classes=["background", "cat", "dog", "car"])
    with pytest.raises(DataError, match=r"000.png holds value\(s\) \[3\]"):
        ds.class_presence(0)
    with pytest.raises(DataError, match="classes.txt"):
        ds.load_mask(0)


def test_a_truncated_image_is_caught_by_the_label_scan_before_training(folder, tmp_path):
    from ciss.scenario import build_scenario

    path = folder / "images" / "001.jpg"  # large enough for its header to survive the cut
    noise = np.random.default_rng(0).integers(0, 255, (120, 160, 3)).astype(np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    Image.fromarray(np.zeros((120, 160), np.uint8), mode="L").save(folder / "labels" / "001.png")
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # cut mid-stream
    FolderDataset(folder)  # the headers read fine
    with pytest.raises(DataError, match=r"001.jpg .*truncated"):
        build_scenario(FolderDataset(folder), "1-1", cache_dir=tmp_path / "cache", progress=False)
