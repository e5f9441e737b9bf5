"""Conformance: our VOC loader + image filter reproduce the official MiB and RCIL step files.

Needs ../shared/conformance/voc (label PNGs, lists and .npy files, see its README); skipped when
absent. The class-presence tables of the 12,031 masks are computed once per session (about 10 s on
2 cores) into a temporary cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ciss.data import build_dataset
from ciss.scenario import Scenario, build_scenario

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VOC = SHARED / "conformance" / "voc"
SPLITS = VOC / "splits"

pytestmark = [
    pytest.mark.shared,
    pytest.mark.skipif(
        not (VOC / "list" / "train_aug.txt").is_file(),
        reason=f"VOC conformance data not found at {VOC} (only on machines with ../shared)",
    ),
]

# (repository, official folder name, our task name, setting)
CASES = [
    (repo, folder + ov, task, "overlapped" if ov else "disjoint")
    for repo, folder, task in [
        ("mib", "15-5", "15-5"),
        ("mib", "15-5s", "15-1"),
        ("mib", "19-1", "19-1"),
        ("rcil", "15-5s", "15-1"),
        ("rcil", "10-1", "10-1"),
    ]
    for ov in ("", "-ov")
]


@pytest.fixture(scope="session")
def voc_build(tmp_path_factory):
    cache = tmp_path_factory.mktemp("ciss-cache")
    train = build_dataset("voc", "train", VOC)
    val = build_dataset("voc", "val", VOC)
    built: dict[tuple[str, str], Scenario] = {}

    def get(task: str, setting: str) -> Scenario:
        if (task, setting) not in built:
            built[task, setting] = build_scenario(train, task, setting, test=val,
                                                  cache_dir=cache, progress=False)
        return built[task, setting]

    return get


def test_voc_lists_match_file_order():
    train = build_dataset("voc", "train", VOC)
    val = build_dataset("voc", "val", VOC)
    assert (len(train), len(val)) == (10582, 1449)
    assert train.ids[0] == "2007_000032" and train.ids == sorted(train.ids)
    assert not set(train.ids) & set(val.ids)


@pytest.mark.parametrize("repo, folder, task, setting", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_official_step_files(voc_build, repo, folder, task, setting):
    sc = voc_build(task, setting)
    files = sorted((SPLITS / repo / folder).glob("*.npy"))
    assert files, f"no official files in {SPLITS / repo / folder}"
    ours = {"train": sc.train_indices, "val": sc.val_indices,
            "test_on_val": sc.test_on_val_indices}
    for f in files:
        kind, step = f.stem.rsplit("-", 1)
        official = np.load(f)
        mine = ours[kind](int(step))
        assert np.array_equal(official, mine), (
            f"{f}: official {len(official)} images, ours {len(mine)}, "
            f"{len(set(official.tolist()) ^ set(mine.tolist()))} differ"
        )


def test_every_official_file_is_checked():
    n = sum(len(list((SPLITS / repo / folder).glob("*.npy"))) for repo, folder, _, _ in CASES)
    assert n == 122  # the README's 122 files: 20 MiB + 102 RCIL
