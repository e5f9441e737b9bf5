"""The data a run reads: its datasets (with the resized-image cache), and the loaders that batch a
step's images for training and for evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ciss.config import RunConfig, default_cache_root
from ciss.data import build_dataset
from ciss.data.base import SegDataset
from ciss.data.image_cache import ResizeCache, cacheable
from ciss.data.transforms import EvalTransform, Resized, TrainTransform
from ciss.engine.distributed import DistInfo
from ciss.scenario import Scenario
from ciss.types import Batch


def cache_root(cfg: RunConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return default_cache_root()


def open_datasets(cfg: RunConfig) -> tuple[SegDataset, Optional[SegDataset]]:
    """The run's train and test datasets (test None when the scenario holds out its own)."""
    d = cfg.data
    train_set = build_dataset(d.dataset, split=d.train_split, root=d.root, **d.options)
    test_set = (None if d.test_split in (None, "none") else
                build_dataset(d.dataset, split=d.test_split, root=d.test_root or d.root, **d.options))
    if d.resize and d.image_cache:  # decode and resize each file once (data/image_cache.py)
        images = cache_root(cfg) / "images"
        if cacheable(train_set):
            train_set = ResizeCache(train_set, d.resize, images)
        if test_set is not None and cacheable(test_set):
            test_set = ResizeCache(test_set, d.resize, images)
    return train_set, test_set


def collate(items: list[tuple]) -> Batch | list[Batch]:
    """Stack (image, label, index[, extra maps]) items into a Batch.

    Images of different sizes become single-image batches (evaluation at native resolution).
    """
    if len({tuple(it[0].shape) for it in items}) > 1:
        return [collate([it]) for it in items]  # type: ignore[misc]
    extras = [it[3] if len(it) > 3 else {} for it in items]
    return Batch(
        image=torch.stack([it[0] for it in items]),
        label=torch.stack([it[1] for it in items]).long(),
        index=torch.tensor([it[2] for it in items]),
        extra={k: torch.stack([torch.as_tensor(e[k]) for e in extras]) for k in extras[0]},
    )


def iter_batches(loader: Iterable, device: torch.device) -> Iterator[Batch]:
    for b in loader:
        for one in (b if isinstance(b, list) else [b]):
            yield one.to(device)


class DeviceLoader:
    """A DataLoader view that yields Batches on the device; methods iterate it in their hooks."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader = loader
        self.device = device

    def __iter__(self) -> Iterator[Batch]:
        return iter_batches(self.loader, self.device)

    def __len__(self) -> int:
        return len(self.loader)


def size_batches(data: Dataset, batch_size: int) -> Optional[list[list[int]]]:
    """Batches of items of one size, in order of first appearance, when the items' sizes differ and
    are known from file headers (``StepDataset.item_sizes``); None otherwise. Evaluation of images at
    their own size then runs in full batches instead of one image at a time (collate makes a batch
    of one of each image of a mixed batch); a confusion matrix does not depend on the order."""
    sizes_of = getattr(data, "item_sizes", None)
    sizes = sizes_of() if callable(sizes_of) else None
    if sizes is None or len(set(sizes)) <= 1:
        return None
    groups: dict[tuple[int, int], list[int]] = {}
    for k, size in enumerate(sizes):
        groups.setdefault(size, []).append(k)
    return [g[s : s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]


def batch_loader(dataset: Dataset, batch_size: int, train: bool, cfg: RunConfig, dist: DistInfo,
                 device: torch.device, batch_sampler: Optional[torch.utils.data.Sampler] = None,
                 method_name: str = "") -> DataLoader:
    """Seeded shuffled batches (train=True) or batches in order; a rank's shard under torchrun."""
    if batch_sampler is not None:  # the method composes its own batches (e.g. half memory)
        if dist.enabled:
            raise ValueError(f"method '{method_name}' composes its own batches, which is "
                             "not supported under torchrun yet; run it in one process")
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate,
                          num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    sampler = None
    if dist.enabled:
        sampler = torch.utils.data.distributed.DistributedSampler(
            dataset, num_replicas=dist.world, rank=dist.rank, shuffle=train, seed=cfg.seed)
    g = torch.Generator()
    g.manual_seed(cfg.seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None,
                      sampler=sampler, num_workers=cfg.data.num_workers,
                      collate_fn=collate, drop_last=train and len(dataset) > batch_size,
                      generator=g, persistent_workers=False,
                      pin_memory=device.type == "cuda")


def train_transform(cfg: RunConfig) -> Resized:
    """Training's augmentation: the resize, then random rescale, crop and flip."""
    return Resized(TrainTransform(cfg.data.crop_size, tuple(cfg.data.scale)), cfg.data.resize)


def eval_transform(cfg: RunConfig) -> Resized:
    """Evaluation's preprocessing: the resize, then the evaluation size if any."""
    return Resized(EvalTransform(cfg.data.eval_size), cfg.data.resize)


def step_images(scenario: Scenario, step: int, train: bool, cfg: RunConfig,
                dist: DistInfo) -> DataLoader:
    """Step `step`'s training images (train=True) or test images, at evaluation size, unshuffled."""
    transform = eval_transform(cfg)
    data = scenario.train_dataset(step, transform) if train else scenario.test_dataset(step, transform)
    if dist.enabled and not train:  # each rank evaluates a shard; the matrices are summed
        data = torch.utils.data.Subset(data, list(range(dist.rank, len(data), dist.world)))
    return ordered_loader(data, cfg)


def ordered_loader(data: Dataset, cfg: RunConfig) -> DataLoader:
    """Evaluation batches of `data` in order, of one image size each where sizes differ."""
    batches = size_batches(data, cfg.optim.eval_batch_size)
    if batches is not None:
        return DataLoader(data, batch_sampler=batches, num_workers=cfg.data.num_workers,
                          collate_fn=collate)
    return DataLoader(data, batch_size=cfg.optim.eval_batch_size, shuffle=False,
                      num_workers=cfg.data.num_workers, collate_fn=collate)


def progress_batches(loader: DataLoader, device: torch.device, desc: str, show: bool) -> Iterable[Batch]:
    """The loader's batches on the device, counted in images on a progress bar when `show`."""
    total = len(loader.dataset)  # type: ignore[arg-type]
    bar = tqdm(total=total, leave=False, desc=desc, unit="img", disable=not show)
    for batch in iter_batches(loader, device):
        yield batch
        bar.update(batch.image.shape[0])
    bar.close()
