"""Raw datasets (image + raw mask), transforms and exemplar memory.

Datasets return raw label values; relabelling to a step's label space is the scenario's job
(`ciss.scenario`), done with one lookup table.
"""

from ciss.data.ade20k import ADE20K_CLASSES, ADE20KDataset
from ciss.data.base import SegDataset, compute_presence
from ciss.data.cityscapes import CITY_ORDER, CITYSCAPES_CLASSES, CityscapesDataset
from ciss.data.errors import DataError
from ciss.data.folder import FolderDataset
from ciss.data.memory import ExemplarMemory, MixedBatchSampler, with_memory
from ciss.data.registry import DATASETS, build_dataset, list_datasets
from ciss.data.synthetic import SyntheticDataset
from ciss.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform
from ciss.data.voc import VOC_CLASSES, VOCDataset

__all__ = [
    "ADE20K_CLASSES",
    "ADE20KDataset",
    "CITY_ORDER",
    "CITYSCAPES_CLASSES",
    "CityscapesDataset",
    "DATASETS",
    "DataError",
    "EvalTransform",
    "ExemplarMemory",
    "FolderDataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MixedBatchSampler",
    "SegDataset",
    "SyntheticDataset",
    "TrainTransform",
    "VOC_CLASSES",
    "VOCDataset",
    "build_dataset",
    "compute_presence",
    "list_datasets",
    "with_memory",
]
